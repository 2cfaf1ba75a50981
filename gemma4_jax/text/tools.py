"""Tool declarations: JSON-schema specs, Python functions, and their Gemma 4 text.

`tool_spec` brings every accepted form to the OpenAI form
`{'type': 'function', 'function': {name, description, parameters}}`.
`format_declaration` writes that as the official Gemma 4 chat template does,
`<|tool>declaration:NAME{description:<|"|>...<|"|>,parameters:{...}}<tool|>`.
Keys come in `dictsort` order and types in upper case.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from gemma4_jax.text.tool_calls import STRING_DELIMITER, _sorted_items, format_value

ToolLike = Mapping[str, Any] | Callable[..., Any]

_JSON_TYPES = {str: 'string', int: 'integer', float: 'number', bool: 'boolean'}
_STANDARD_KEYS = ('description', 'type', 'properties', 'required', 'nullable')


def tool_spec(tool: ToolLike) -> dict[str, Any]:
  """Return the OpenAI-style spec of a tool given as a spec or a function.

  Accepts `{'type': 'function', 'function': {...}}`, a bare
  `{'name', 'description', 'parameters'}` mapping, or a Python function,
  whose schema comes from its signature, type hints and the `Args:` section
  of its docstring.
  """
  if isinstance(tool, Mapping):
    if 'function' in tool:
      function = tool['function']
    else:
      function = tool
    if not isinstance(function, Mapping) or 'name' not in function:
      raise ValueError(
          f'tool spec {tool!r} has no function name; pass'
          " {'type': 'function', 'function': {'name': ..., 'description': ...,"
          " 'parameters': {...}}} or a Python function"
      )
    return {'type': 'function', 'function': dict(function)}
  if callable(tool):
    return {'type': 'function', 'function': function_schema(tool)}
  raise TypeError(f'a tool must be a mapping or a function, got {type(tool).__name__}')


def function_schema(function: Callable[..., Any]) -> dict[str, Any]:
  """Build `{name, description, parameters}` from a function's signature.

  Raises:
    ValueError: a parameter has no type hint, or is `*args` / `**kwargs`.
  """
  name = function.__name__
  description, argument_docs = _parse_docstring(inspect.getdoc(function) or '')
  hints = typing.get_type_hints(function)
  properties: dict[str, Any] = {}
  required: list[str] = []
  for parameter in inspect.signature(function).parameters.values():
    if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
      raise ValueError(
          f'tool function {name} has a variadic parameter {parameter.name};'
          ' give it explicit parameters or pass a JSON-schema spec'
      )
    if parameter.name not in hints:
      raise ValueError(
          f'parameter {parameter.name!r} of tool function {name} has no type'
          ' hint; add one so that its schema type is known'
      )
    schema = _type_schema(hints[parameter.name], where=f'{name}({parameter.name})')
    if parameter.name in argument_docs:
      schema = {'description': argument_docs[parameter.name], **schema}
    properties[parameter.name] = schema
    if parameter.default is inspect.Parameter.empty:
      required.append(parameter.name)

  parameters: dict[str, Any] = {'type': 'object', 'properties': properties}
  if required:
    parameters['required'] = required
  return {'name': name, 'description': description, 'parameters': parameters}


def _type_schema(hint: Any, *, where: str) -> dict[str, Any]:
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)

  if origin in (typing.Union, types.UnionType):
    non_null = [a for a in args if a is not type(None)]
    if len(non_null) == 1 and len(non_null) < len(args):
      return {**_type_schema(non_null[0], where=where), 'nullable': True}
    raise ValueError(f'{where}: union type {hint} is not supported; use one type or X | None')
  if origin is typing.Literal:
    kinds = {type(a) for a in args}
    if len(kinds) != 1 or next(iter(kinds)) not in _JSON_TYPES:
      raise ValueError(f'{where}: Literal values must share one of str, int, float, bool')
    return {'type': _JSON_TYPES[next(iter(kinds))], 'enum': list(args)}
  if isinstance(hint, type) and issubclass(hint, enum.Enum):
    values = [member.value for member in hint]
    return _type_schema(typing.Literal[tuple(values)], where=where)
  if hint in _JSON_TYPES:
    return {'type': _JSON_TYPES[hint]}
  if hint in (list, tuple) or origin in (list, tuple, typing.Sequence, set):
    schema: dict[str, Any] = {'type': 'array'}
    if args and args[0] is not Ellipsis:
      schema['items'] = _type_schema(args[0], where=where)
    return schema
  if hint is dict or origin in (dict, Mapping):
    return {'type': 'object'}
  if hint is Any:
    raise ValueError(f'{where}: Any has no schema type; use a concrete type')
  raise ValueError(f'{where}: type {hint} has no JSON-schema equivalent')


_SECTION = re.compile(r'^(Args|Arguments|Parameters|Returns|Yields|Raises|Examples?|Notes?|Attributes):\s*$')
_ARGUMENT_LINE = re.compile(r'^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$')


def _parse_docstring(docstring: str) -> tuple[str, dict[str, str]]:
  """Split a Google-style docstring into its description and `Args:` entries."""
  description_lines: list[str] = []
  arguments: dict[str, str] = {}
  section = None
  current = None
  argument_indent = None
  for line in docstring.splitlines():
    stripped = line.strip()
    header = _SECTION.match(stripped)
    if header and (len(line) - len(line.lstrip())) == 0:
      section = header.group(1)
      current, argument_indent = None, None
      continue
    if section is None:
      description_lines.append(stripped)
      continue
    if section not in ('Args', 'Arguments', 'Parameters') or not stripped:
      continue
    indent = len(line) - len(line.lstrip())
    match = _ARGUMENT_LINE.match(stripped)
    if match and (argument_indent is None or indent <= argument_indent):
      argument_indent = indent
      current = match.group(1).lstrip('*')
      arguments[current] = match.group(3).strip()
    elif current is not None:
      arguments[current] = (arguments[current] + ' ' + stripped).strip()
  # The declaration is one line of text, so paragraphs are joined.
  description = re.sub(r'\s+', ' ', ' '.join(description_lines)).strip()
  return description, arguments


# ---------------------------------------------------------------------------
# Declaration text, following the official Gemma 4 chat template.


def _quoted(text: Any) -> str:
  return f'{STRING_DELIMITER}{"" if text is None else text}{STRING_DELIMITER}'


def _upper_type(value: Any) -> str:
  return '' if value is None else str(value).upper()


def _template_argument(value: Any) -> str:
  """`format_argument` of the template with quoted keys (schema values)."""
  if isinstance(value, Mapping):
    return '{' + ','.join(f'{_quoted(k)}:{_template_argument(v)}' for k, v in _sorted_items(value)) + '}'
  if isinstance(value, (list, tuple)):
    return '[' + ','.join(_template_argument(v) for v in value) + ']'
  return format_value(value)


def _get(value: Any, key: str) -> Any:
  return value.get(key) if isinstance(value, Mapping) else None


def _format_properties(properties: Mapping[str, Any], *, skip_standard_keys: bool = False) -> str:
  """One `name:{description,...,type}` entry per property, in key order."""
  entries = []
  for key, value in _sorted_items(properties):
    if skip_standard_keys and key in _STANDARD_KEYS:
      continue
    parts = []
    if _get(value, 'description'):
      parts.append('description:' + _quoted(value['description']))
    kind = _upper_type(_get(value, 'type'))

    if kind == 'STRING' and _get(value, 'enum'):
      parts.append('enum:' + _template_argument(value['enum']))
    elif kind == 'ARRAY' and isinstance(_get(value, 'items'), Mapping) and value['items']:
      parts.append('items:{' + _format_items_schema(value['items']) + '}')

    if _get(value, 'nullable'):
      parts.append('nullable:true')

    if kind == 'OBJECT':
      nested = _get(value, 'properties')
      if isinstance(nested, Mapping):
        parts.append('properties:{' + _format_properties(nested) + '}')
      elif isinstance(value, Mapping):
        # The template lists an object's own non-schema keys when it has no
        # `properties`.
        parts.append('properties:{' + _format_properties(value, skip_standard_keys=True) + '}')
      if _get(value, 'required'):
        parts.append('required:[' + ','.join(_quoted(r) for r in value['required']) + ']')

    parts.append('type:' + _quoted(kind))
    entries.append(f'{key}:{{' + ','.join(parts) + '}')
  return ','.join(entries)


def _format_items_schema(items: Mapping[str, Any]) -> str:
  parts = []
  for key, value in _sorted_items(items):
    if value is None:
      continue
    if key == 'properties':
      inner = _format_properties(value) if isinstance(value, Mapping) else ''
      parts.append('properties:{' + inner + '}')
    elif key == 'required':
      parts.append('required:[' + ','.join(_quoted(r) for r in value) + ']')
    elif key == 'type':
      if isinstance(value, str):
        parts.append('type:' + _template_argument(value.upper()))
      else:
        parts.append('type:' + _template_argument([str(v).upper() for v in value]))
    else:
      parts.append(f'{key}:' + _template_argument(value))
  return ','.join(parts)


def format_declaration(tool: ToolLike) -> str:
  """Write one tool declaration, `<|tool>declaration:NAME{...}<tool|>`."""
  function = tool_spec(tool)['function']
  text = 'declaration:' + function['name'] + '{description:' + _quoted(function.get('description'))

  parameters = function.get('parameters')
  if parameters:
    text += ',parameters:{'
    if parameters.get('properties'):
      text += 'properties:{' + _format_properties(parameters['properties']) + '},'
    if parameters.get('required'):
      text += 'required:[' + ','.join(_quoted(r) for r in parameters['required']) + '],'
    # NOTE: the official template closes `parameters:{` only after a `type`;
    # a schema without one gives unbalanced braces there and here alike.
    if parameters.get('type'):
      text += 'type:' + _quoted(_upper_type(parameters['type'])) + '}'

  if 'response' in function:
    response = function['response'] or {}
    text += ',response:{'
    if _get(response, 'description'):
      text += 'description:' + _quoted(response['description']) + ','
    if _upper_type(_get(response, 'type')) == 'OBJECT':
      text += 'type:' + _quoted('OBJECT') + '}'

  return '<|tool>' + text + '}<tool|>'
