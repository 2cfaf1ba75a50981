"""Text side of Gemma 4: tokenizer, chat prompts, tool declarations and calls."""

from gemma4_jax.text.chat import encode_chat, format_chat, strip_thinking
from gemma4_jax.text.fetch import (
    ChecksumMismatchError,
    TokenizerFetchError,
    default_cache_dir,
    fetch_tokenizer,
)
from gemma4_jax.text.tokenizer import (
    IncrementalDetokenizer,
    MissingSpecialTokenError,
    SpecialTokens,
    Tokenizer,
    TokenizerError,
)
from gemma4_jax.text.tool_calls import (
    ParsedOutput,
    ParseWarning,
    StreamParser,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallEvent,
    ToolCallSyntaxError,
    format_tool_call,
    format_tool_response,
    format_value,
    parse_model_output,
    parse_tool_call,
    parse_value,
)
from gemma4_jax.text.tools import format_declaration, function_schema, tool_spec
