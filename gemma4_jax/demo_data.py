"""A seeded synthetic tool-calling dataset for the from-scratch demo.

    paths = make_tool_calling_dataset('/tmp/demo', seed=0, num_train=20000,
                                      num_heldout=200)
    paths.train, paths.heldout   # JSONL files of `training.records` lines

Every line is a conversation `{"messages": [...], "tools": [...]}` whose
`tools` declares, as JSON-schema specs, the tool its request needs (or a
random one when it needs none) and optionally others (`num_tools`), drawn
from six (`TOOLS`). The user asks for one thing in one of many phrasings
(templates with synonyms, word orders, optional politeness, several ways to
write numbers, dates, times and units). The first model turn is the target:

- a native Gemma 4 tool call whose arguments are typed (strings, integers,
  numbers, booleans, enums, a list of strings and a nested object), with
  values normalised from the request: `5 km` becomes `value:5,
  from_unit:"kilometers"`, `March 5, 2026 at 3:30 pm` becomes
  `date:"2026-03-05", start_time:"15:30"`;
- or, for greetings, thanks and requests that no tool covers, a fixed short
  text answer and no call.

A fifth of the training examples that call a tool go on with the tool's
response and a final answer, so the whole format is trained. Held-out
examples end at the first model message, which `gemma4_jax.evaluation`
answers and scores.

Held-out requests never appear in training: no two examples of the whole
dataset share a request text once case, punctuation and spacing are
ignored. Their values come from the same vocabularies (cities, names,
messages, titles, labels) as the training requests. Numbers and dates may
be new, but only as new combinations of digits, months and days.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple


# ---------------------------------------------------------------------------
# The tools, as JSON-schema specs.

_WEATHER_UNITS = ['celsius', 'fahrenheit']
_TIMER_UNITS = ['seconds', 'minutes', 'hours']
_CHANNELS = ['sms', 'email', 'whatsapp']
_CABINS = ['economy', 'premium_economy', 'business', 'first']

# Canonical unit -> (quantity, factor to the base unit of the quantity).
# Temperatures are converted by formula in `_convert`.
_UNIT_FACTORS = {
    'kilometers': ('length', 1000.0),
    'miles': ('length', 1609.344),
    'meters': ('length', 1.0),
    'feet': ('length', 0.3048),
    'centimeters': ('length', 0.01),
    'inches': ('length', 0.0254),
    'kilograms': ('mass', 1000.0),
    'pounds': ('mass', 453.59237),
    'grams': ('mass', 1.0),
    'ounces': ('mass', 28.349523125),
    'liters': ('volume', 1000.0),
    'gallons': ('volume', 3785.411784),
    'milliliters': ('volume', 1.0),
    'cups': ('volume', 240.0),
    'celsius': ('temperature', None),
    'fahrenheit': ('temperature', None),
}
_CONVERSION_UNITS = list(_UNIT_FACTORS)


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]):
  return {
      'type': 'function',
      'function': {
          'name': name,
          'description': description,
          'parameters': {'type': 'object', 'properties': properties, 'required': required},
      },
  }


# Descriptions are short because every example declares its tools and a
# declaration costs tokens on every training step.
TOOLS: list[dict[str, Any]] = [
    _function(
        'get_weather',
        'Weather, or a forecast of 2 to 7 days.',
        {
            'city': {'type': 'string'},
            'unit': {'type': 'string', 'enum': _WEATHER_UNITS},
            'days': {'type': 'integer'},
        },
        ['city'],
    ),
    _function(
        'set_timer',
        'Start a timer.',
        {
            'duration': {'type': 'integer'},
            'unit': {'type': 'string', 'enum': _TIMER_UNITS},
            'label': {'type': 'string'},
        },
        ['duration', 'unit'],
    ),
    _function(
        'convert_units',
        'Convert a value. Units in full, like miles.',
        {
            'value': {'type': 'number'},
            'from_unit': {'type': 'string'},
            'to_unit': {'type': 'string'},
        },
        ['value', 'from_unit', 'to_unit'],
    ),
    _function(
        'send_message',
        'Message a contact.',
        {
            'recipient': {'type': 'string'},
            'text': {'type': 'string'},
            'channel': {'type': 'string', 'enum': _CHANNELS},
            'urgent': {'type': 'boolean'},
        },
        ['recipient', 'text'],
    ),
    _function(
        'create_event',
        'Add an event. Date YYYY-MM-DD, time HH:MM.',
        {
            'title': {'type': 'string'},
            'date': {'type': 'string'},
            'start_time': {'type': 'string'},
            'duration_minutes': {'type': 'integer'},
            'attendees': {'type': 'array', 'items': {'type': 'string'}},
        },
        ['title', 'date', 'start_time'],
    ),
    _function(
        'search_flights',
        'Find flights. Date YYYY-MM-DD.',
        {
            'origin': {'type': 'string'},
            'destination': {'type': 'string'},
            'date': {'type': 'string'},
            'passengers': {'type': 'integer'},
            'preferences': {
                'type': 'object',
                'properties': {
                    'cabin': {'type': 'string', 'enum': _CABINS},
                    'nonstop': {'type': 'boolean'},
                },
            },
        },
        ['origin', 'destination', 'date'],
    ),
]
_TOOLS_BY_NAME = {tool['function']['name']: tool for tool in TOOLS}
# Each example declares only the tool it needs. A declaration takes about
# 60 tokens, as many as the rest of an example, so each further tool would
# make a training step about a third longer.
DEFAULT_NUM_TOOLS = 1

# ---------------------------------------------------------------------------
# Vocabularies. Held-out requests draw from these same lists.

CITIES = [
    'Paris', 'London', 'Tokyo', 'New York', 'San Francisco', 'Berlin', 'Madrid',
    'Rome', 'Lisbon', 'Amsterdam', 'Dublin', 'Oslo', 'Stockholm', 'Helsinki',
    'Vienna', 'Prague', 'Warsaw', 'Athens', 'Istanbul', 'Cairo', 'Nairobi',
    'Cape Town', 'Mumbai', 'Delhi', 'Bangkok', 'Singapore', 'Seoul', 'Beijing',
    'Sydney', 'Melbourne', 'Auckland', 'Toronto', 'Vancouver', 'Chicago',
    'Boston', 'Mexico City', 'Lima', 'Buenos Aires', 'Rio de Janeiro', 'Zurich',
]
NAMES = [
    'Alice', 'Bob', 'Carol', 'David', 'Emma', 'Farid', 'Grace', 'Hiro', 'Ines',
    'Jamal', 'Kate', 'Liam', 'Maya', 'Noah', 'Olga', 'Pedro', 'Quinn', 'Rosa',
    'Sam', 'Tara', 'Umar', 'Vera', 'Wei', 'Yara', 'Zoe', 'Mom', 'Dad',
]
MESSAGES = [
    "I'm running ten minutes late", 'Dinner is ready', 'Can you call me back?',
    'Happy birthday!', 'The meeting moved to Friday', "Don't forget the milk",
    'I landed safely', 'See you at the station', 'The keys are under the mat',
    'Good luck with the interview', 'Let me know when you get home',
    'I sent you the report', 'Are we still on for lunch?', 'Running a bit late',
    'Please bring the charger', 'The package has arrived', 'Thanks for the flowers',
    'Can we talk tonight?', 'I will pick up the kids', 'The train is delayed',
    'Save me a seat', 'Call the plumber please', 'Meet me at the cafe at noon',
    'The tickets are booked', 'Congratulations on the new job!',
    'I left my umbrella at your place', 'Feed the cat tonight',
    'See you tomorrow morning', 'The wifi password changed', 'Miss you already',
]
EVENT_TITLES = [
    'Team meeting', 'Dentist appointment', 'Yoga class', 'Project review',
    'Lunch with Priya', 'Book club', 'Car service', 'Piano lesson',
    'Budget planning', 'Doctor visit', 'Parent-teacher conference',
    'Coffee with Leo', 'Sprint planning', 'Haircut', 'Gym session',
    'Client call', 'Birthday party', 'Job interview', 'Weekly sync',
    'Movie night', 'Guitar practice', 'Design review', 'Tax appointment',
    'Football training', 'Quarterly review',
]
TIMER_LABELS = [
    'pasta', 'laundry', 'tea', 'oven', 'workout', 'nap', 'parking meter',
    'pizza', 'eggs', 'break', 'rice', 'meditation', 'bread', 'homework',
]
TOPICS = [
    'penguins', 'the ocean', 'black holes', 'medieval castles', 'chess',
    'volcanoes', 'honey bees', 'the Roman empire', 'jazz', 'origami',
    'dinosaurs', 'coffee', 'the moon', 'robots', 'pirates', 'tigers',
    'ancient Egypt', 'mushrooms', 'bicycles', 'photography', 'knitting',
    'the piano', 'lighthouses', 'submarines', 'tea ceremonies',
]

MONTHS = [
    'January', 'February', 'March', 'April', 'May', 'June', 'July', 'August',
    'September', 'October', 'November', 'December',
]
YEARS = [2025, 2026]
NUMBER_WORDS = {
    1: 'one', 2: 'two', 3: 'three', 4: 'four', 5: 'five', 6: 'six', 7: 'seven',
    8: 'eight', 9: 'nine', 10: 'ten', 11: 'eleven', 12: 'twelve', 15: 'fifteen',
    20: 'twenty', 30: 'thirty', 45: 'forty-five', 60: 'sixty', 90: 'ninety',
}

# Surface forms of each canonical unit after a number ("5 km") and after
# "in" / "to" ("in kilometers").
_UNIT_WORDS = {
    'kilometers': ['km', 'kilometers', 'kilometres'],
    'miles': ['miles', 'mi'],
    'meters': ['meters', 'metres', 'm'],
    'feet': ['feet', 'ft'],
    'centimeters': ['cm', 'centimeters'],
    'inches': ['inches'],
    'kilograms': ['kg', 'kilograms', 'kilos'],
    'pounds': ['pounds', 'lb', 'lbs'],
    'grams': ['grams', 'g'],
    'ounces': ['ounces', 'oz'],
    'liters': ['liters', 'litres', 'L'],
    'gallons': ['gallons', 'gal'],
    'milliliters': ['ml', 'milliliters'],
    'cups': ['cups'],
    'celsius': ['°C', 'degrees Celsius', 'Celsius'],
    'fahrenheit': ['°F', 'degrees Fahrenheit', 'Fahrenheit'],
}
_TIMER_UNIT_WORDS = {
    # (plural forms, the singular used in "a 10-minute timer")
    'seconds': (['seconds', 'secs', 'sec'], 'second'),
    'minutes': (['minutes', 'mins', 'min'], 'minute'),
    'hours': (['hours', 'hrs', 'hr'], 'hour'),
}

GREETING_ANSWER = 'Hello! How can I help you today?'
THANKS_ANSWER = "You're welcome!"
OUT_OF_SCOPE_ANSWER = "Sorry, I can't help with that."

# ---------------------------------------------------------------------------
# Request phrasing.


@dataclasses.dataclass(frozen=True)
class _Request:
  """One generated request and the first model turn it expects.

  Attributes:
    text: The user message.
    call: `(tool name, arguments)`, or None when the reply is text.
    answer: The text reply to a request that needs no tool.
  """

  text: str
  call: tuple[str, dict[str, Any]] | None = None
  answer: str | None = None


def _pick(rng: random.Random, options: Sequence[Any]) -> Any:
  return options[rng.randrange(len(options))]


def _number_text(rng: random.Random, value: int, word_probability: float) -> str:
  if value in NUMBER_WORDS and rng.random() < word_probability:
    return NUMBER_WORDS[value]
  return str(value)


def _finish(rng: random.Random, core: str, *, question: bool, open_end: bool = False) -> str:
  """Add optional politeness, capitalisation and end punctuation to a request.

  Args:
    core: The request without a leading polite phrase.
    question: The core is a question ("what is ...") or a bare phrase ("5 km
      in miles"), which takes no "Can you" in front and no "thanks" after.
    open_end: The core ends with a value copied verbatim (an unquoted
      message), so nothing may follow it.
  """
  if question:
    prefix = _pick(rng, ['', '', '', 'Hey, ', 'Quick question: ', 'Hi! '])
  else:
    prefix = _pick(rng, ['', '', '', 'Please ', 'Can you ', 'Could you ', 'Hey, ', 'I need you to '])
  polite_question = prefix in ('Can you ', 'Could you ')

  text = prefix + core
  if not open_end:
    if question:
      suffix = _pick(rng, ['', '', '', ' please'])
    else:
      suffix = _pick(rng, ['', '', '', ' please', ', thanks', ', thank you'])
    if question or polite_question:
      end = _pick(rng, ['?', '?', ''])
    else:
      end = _pick(rng, ['.', '', '!'])
    text += suffix + end

  if rng.random() < 0.15:
    # Casual writing: no capital at the start. Only template words start a
    # request here, so no value (a city, a name) loses its capital.
    text = text[0].lower() + text[1:]
  else:
    text = text[0].upper() + text[1:]
  return text


def _weather(rng: random.Random) -> _Request:
  city = _pick(rng, CITIES)
  arguments: dict[str, Any] = {'city': city}

  if rng.random() < 0.3:
    days = rng.randint(2, 7)
    arguments['days'] = days
    days_text = _number_text(rng, days, 0.4)
    core, question = _pick(rng, [
        (f'what is the {days}-day forecast for {city}', True),
        (f'give me the forecast for {city} for the next {days_text} days', False),
        (f'what will the weather be like in {city} over the next {days_text} days', True),
        (f'show me a {days}-day weather forecast for {city}', False),
        (f'how does the weather look in {city} for the next {days_text} days', True),
    ])
  else:
    core, question = _pick(rng, [
        (f"what's the weather in {city}", True),
        (f'what is the weather like in {city}', True),
        (f"how's the weather in {city} right now", True),
        (f'is it raining in {city}', True),
        (f'tell me the current weather in {city}', False),
        (f'do I need an umbrella in {city} today', True),
        (f'how warm is it in {city}', True),
        (f'check the weather in {city}', False),
        (f'weather report for {city}', True),
    ])

  if rng.random() < 0.35:
    unit = _pick(rng, _WEATHER_UNITS)
    arguments['unit'] = unit
    core += ' in ' + _pick(rng, _UNIT_WORDS[unit])

  return _Request(_finish(rng, core, question=question), call=('get_weather', arguments))


def _timer(rng: random.Random) -> _Request:
  unit = _pick(rng, ['minutes', 'minutes', 'minutes', 'seconds', 'hours'])
  if unit == 'minutes':
    duration = _pick(rng, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 45, 50, 60, 75, 90])
  elif unit == 'seconds':
    duration = _pick(rng, [10, 15, 20, 30, 40, 45, 50, 60, 90])
  else:
    duration = rng.randint(1, 5)
  plurals, singular = _TIMER_UNIT_WORDS[unit]
  if duration == 1:
    unit_text = _pick(rng, [singular, singular, plurals[2]])  # "1 minute", "1 min"
  else:
    unit_text = _pick(rng, plurals)
  amount = _number_text(rng, duration, 0.3)
  arguments: dict[str, Any] = {'duration': duration, 'unit': unit}

  core = _pick(rng, [
      f'set a timer for {amount} {unit_text}',
      f'set a {amount}-{singular} timer',
      f'start a timer for {amount} {unit_text}',
      f'start a {amount} {unit_text} countdown',
      f'time {amount} {unit_text} for me',
      f'count down {amount} {unit_text}',
      f'timer for {amount} {unit_text}',
  ])
  if rng.random() < 0.4:
    label = _pick(rng, TIMER_LABELS)
    arguments['label'] = label
    core += _pick(rng, [f' for the {label}', f' called {label}', f' labeled {label}'])
  return _Request(_finish(rng, core, question=False), call=('set_timer', arguments))


def _conversion_value(rng: random.Random, quantity: str) -> tuple[int | float, str]:
  """Draw a conversion value and its text in the request."""
  kind = rng.random()
  if quantity == 'temperature':
    value = rng.randint(-30, 110)
    return value, str(value)
  if kind < 0.5:
    value = rng.randint(1, 500)
    return value, str(value)
  if kind < 0.8:
    text = f'{rng.randint(0, 99)}.{rng.randint(1, 9)}'
    return float(text), text
  if kind < 0.9:
    text = f'{rng.randint(0, 20)}.{rng.randint(1, 99):02d}'
    return float(text), text
  value = rng.randint(1000, 25000)
  return value, f'{value:,}'


def _conversion(rng: random.Random) -> _Request:
  from_unit = _pick(rng, _CONVERSION_UNITS)
  quantity = _UNIT_FACTORS[from_unit][0]
  to_unit = _pick(rng, [u for u in _CONVERSION_UNITS if u != from_unit and _UNIT_FACTORS[u][0] == quantity])
  value, value_text = _conversion_value(rng, quantity)
  from_text = _pick(rng, _UNIT_WORDS[from_unit])
  to_text = _pick(rng, _UNIT_WORDS[to_unit])
  # "how many °C" does not read well: that template takes spelled-out units.
  to_word = to_text if to_text[0].isalpha() else _UNIT_WORDS[to_unit][1]

  templates = [
      (f'convert {value_text} {from_text} to {to_text}', False),
      (f'what is {value_text} {from_text} in {to_text}', True),
      (f'how many {to_word} is {value_text} {from_text}', True),
      (f'change {value_text} {from_text} into {to_text}', False),
      (f'{value_text} {from_text} in {to_text}', True),
      (f'{value_text} {from_text} to {to_text}', True),
  ]
  core, question = _pick(rng, templates)
  arguments = {'from_unit': from_unit, 'to_unit': to_unit, 'value': value}
  return _Request(_finish(rng, core, question=question), call=('convert_units', arguments))


def _message(rng: random.Random) -> _Request:
  name = _pick(rng, NAMES)
  text = _pick(rng, MESSAGES)
  arguments: dict[str, Any] = {'recipient': name, 'text': text}

  channel = _pick(rng, [None, None, 'sms', 'email', 'whatsapp'])
  # (template, whether the message ends the request unquoted)
  if channel is None:
    templates = [
        (f'send {name} a message saying "{text}"', False),
        (f'message {name}: {text}', True),
        (f'tell {name} "{text}"', False),
        (f'send a message to {name}: "{text}"', False),
        (f"let {name} know '{text}'", False),
    ]
  elif channel == 'sms':
    templates = [
        (f'text {name} "{text}"', False),
        (f'send an SMS to {name}: {text}', True),
        (f'send {name} a text saying "{text}"', False),
    ]
  elif channel == 'email':
    templates = [
        (f'email {name}: "{text}"', False),
        (f'send an email to {name} saying "{text}"', False),
        (f'write {name} an email: {text}', True),
    ]
  else:
    templates = [
        (f'whatsapp {name} "{text}"', False),
        (f'send {name} a WhatsApp message: {text}', True),
        (f'tell {name} "{text}" on WhatsApp', False),
    ]
  core, open_end = _pick(rng, templates)
  if channel is not None:
    arguments['channel'] = channel

  urgency = rng.random()
  request = _finish(rng, core, question=False, open_end=open_end)
  if urgency < 0.15:
    arguments['urgent'] = True
    if open_end:
      request = 'Urgent: ' + request[0].lower() + request[1:]
    else:
      request += _pick(rng, [" It's urgent.", ' Mark it as urgent.', ' Urgent!'])
  elif urgency < 0.22:
    arguments['urgent'] = False
    if open_end:
      request = 'Not urgent: ' + request[0].lower() + request[1:]
    else:
      request += _pick(rng, [" It's not urgent.", ' No rush, not urgent.'])
  return _Request(request, call=('send_message', arguments))


def _date(rng: random.Random) -> tuple[str, str]:
  """Draw a date: its ISO form and its text in the request."""
  year, month, day = _pick(rng, YEARS), rng.randint(1, 12), rng.randint(1, 28)
  iso = f'{year}-{month:02d}-{day:02d}'
  name = MONTHS[month - 1]
  text = _pick(rng, [f'{name} {day}, {year}', f'{day} {name} {year}', iso])
  return iso, text


def _time(rng: random.Random) -> tuple[str, str]:
  """Draw a time: its 24-hour `HH:MM` form and its text in the request."""
  hour = rng.randint(8, 18)
  minute = _pick(rng, [0, 0, 0, 30, 30, 15, 45])
  iso = f'{hour:02d}:{minute:02d}'
  twelve = hour - 12 if hour > 12 else hour
  suffix = 'pm' if hour >= 12 else 'am'
  space = _pick(rng, ['', ' '])
  if minute == 0:
    text = _pick(rng, [f'{twelve}{space}{suffix}', f'{twelve}{space}{suffix}', iso])
  else:
    text = _pick(rng, [f'{twelve}:{minute:02d}{space}{suffix}', iso])
  return iso, text


def _names_text(names: Sequence[str]) -> str:
  if len(names) == 1:
    return names[0]
  return ', '.join(names[:-1]) + ' and ' + names[-1]


def _event(rng: random.Random) -> _Request:
  title = _pick(rng, EVENT_TITLES)
  date, date_text = _date(rng)
  start, start_text = _time(rng)
  arguments: dict[str, Any] = {'date': date, 'start_time': start, 'title': title}

  core = _pick(rng, [
      f'schedule {title} on {date_text} at {start_text}',
      f'add "{title}" to my calendar on {date_text} at {start_text}',
      f'create an event called {title} for {date_text} at {start_text}',
      f'put {title} in my calendar for {date_text}, {start_text}',
      f'book {title} at {start_text} on {date_text}',
      f'add an event on {date_text} at {start_text}: {title}',
  ])
  if rng.random() < 0.4:
    minutes, phrase = _pick(rng, [
        (15, '15 minutes'), (30, '30 minutes'), (30, 'half an hour'), (45, '45 minutes'),
        (60, 'an hour'), (60, '1 hour'), (60, '60 minutes'), (90, '90 minutes'),
        (90, 'an hour and a half'), (120, '2 hours'), (120, 'two hours'),
    ])
    arguments['duration_minutes'] = minutes
    core += f' for {phrase}'
  if rng.random() < 0.35:
    attendees = rng.sample(NAMES, rng.randint(1, 2))
    arguments['attendees'] = attendees
    core += _pick(rng, [' with ', ', invite ', ' and invite '])
    core += _names_text(attendees)
  return _Request(_finish(rng, core, question=False), call=('create_event', arguments))


def _flights(rng: random.Random) -> _Request:
  origin, destination = rng.sample(CITIES, 2)
  date, date_text = _date(rng)
  arguments: dict[str, Any] = {'date': date, 'destination': destination, 'origin': origin}

  core, question = _pick(rng, [
      (f'find flights from {origin} to {destination} on {date_text}', False),
      (f'search for a flight from {origin} to {destination} on {date_text}', False),
      (f'I need to fly from {origin} to {destination} on {date_text}', False),
      (f'are there flights to {destination} from {origin} on {date_text}', True),
      (f'look up flights to {destination} leaving {origin} on {date_text}', False),
      (f'what flights go from {origin} to {destination} on {date_text}', True),
  ])
  if rng.random() < 0.4:
    passengers = rng.randint(1, 6)
    arguments['passengers'] = passengers
    if passengers == 1:
      core += _pick(rng, [' for 1 passenger', ' for one person', ', just me'])
    else:
      count = _number_text(rng, passengers, 0.5)
      core += _pick(rng, [f' for {count} passengers', f' for {count} people', f' for {count} adults'])

  preferences: dict[str, Any] = {}
  if rng.random() < 0.3:
    cabin = _pick(rng, _CABINS)
    preferences['cabin'] = cabin
    core += ' in ' + cabin.replace('_', ' ') + _pick(rng, ['', ' class'])
  if rng.random() < 0.3:
    nonstop = rng.random() < 0.7
    preferences['nonstop'] = nonstop
    if nonstop:
      core += _pick(rng, [', nonstop only', ', direct flights only', ' with no layovers'])
    else:
      core += _pick(rng, [', stops are fine', ', layovers are okay'])
  if preferences:
    arguments['preferences'] = preferences
  return _Request(_finish(rng, core, question=question), call=('search_flights', arguments))


def _no_tool(rng: random.Random) -> _Request:
  kind = rng.random()
  if kind < 0.2:
    greeting = _pick(rng, ['Hi', 'Hello', 'Hey', 'Good morning', 'Good afternoon', 'Good evening'])
    greeting += _pick(rng, ['', ' there']) + _pick(rng, ['!', '.', ''])
    greeting += _pick(rng, ['', ' How are you?', ' Are you there?', ' Can you help me?'])
    return _Request(greeting.strip(), answer=GREETING_ANSWER)
  if kind < 0.35:
    thanks = _pick(rng, ['Thanks', 'Thank you', 'Thanks a lot', 'Thank you so much', 'Great, thanks', 'Perfect, thank you', 'Cheers'])
    thanks += _pick(rng, ['!', '.', '']) + _pick(rng, ['', ' That was helpful.', ' That is all for now.'])
    return _Request(thanks.strip(), answer=THANKS_ANSWER)
  topic = _pick(rng, TOPICS)
  core, question = _pick(rng, [
      (f'tell me a joke about {topic}', False),
      (f'write a poem about {topic}', False),
      (f'what do you know about {topic}', True),
      (f'explain {topic} to me', False),
      (f'give me a fun fact about {topic}', False),
      (f'sing a song about {topic}', False),
  ])
  return _Request(_finish(rng, core, question=question), answer=OUT_OF_SCOPE_ANSWER)


# (generator, share of the examples)
_GENERATORS: list[tuple[Callable[[random.Random], _Request], float]] = [
    (_weather, 0.145),
    (_timer, 0.145),
    (_conversion, 0.145),
    (_message, 0.145),
    (_event, 0.145),
    (_flights, 0.145),
    (_no_tool, 0.13),
]

# Shares of the training examples. Held-out examples keep the even shares
# above. Weather, timers, messages and text answers are learnt first, so
# training gives more examples to the kinds that need an ordering or a
# conversion: calendar times (`3 pm` to `15:00`), flight origin and
# destination, the two units of a conversion.
TRAINING_SHARES = {
    '_weather': 0.09,
    '_timer': 0.09,
    '_conversion': 0.18,
    '_message': 0.11,
    '_event': 0.22,
    '_flights': 0.22,
    '_no_tool': 0.09,
}

# ---------------------------------------------------------------------------
# Tool responses and the final replies built from them.


def _convert(value: float, from_unit: str, to_unit: str) -> float:
  if from_unit == 'celsius':
    return value * 9 / 5 + 32
  if from_unit == 'fahrenheit':
    return (value - 32) * 5 / 9
  return value * _UNIT_FACTORS[from_unit][1] / _UNIT_FACTORS[to_unit][1]


def _response_and_answer(rng: random.Random, name: str, arguments: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  """Make up a tool result and the model's final reply built from it."""
  if name == 'get_weather':
    unit = arguments.get('unit', 'celsius')
    temperature = rng.randint(-5, 35) if unit == 'celsius' else rng.randint(25, 95)
    condition = _pick(rng, ['sunny', 'cloudy', 'rainy', 'windy', 'foggy', 'snowy'])
    symbol = '°C' if unit == 'celsius' else '°F'
    response = {'condition': condition, 'temperature': temperature, 'unit': unit}
    if 'days' in arguments:
      response['days'] = arguments['days']
      answer = f'The next {arguments["days"]} days in {arguments["city"]} look mostly {condition}, around {temperature}{symbol}.'
    else:
      answer = f'It is {temperature}{symbol} and {condition} in {arguments["city"]}.'
    return response, answer

  if name == 'set_timer':
    timer_id = f'timer-{rng.randint(100, 999)}'
    label = f' for the {arguments["label"]}' if 'label' in arguments else ''
    answer = f'Your {arguments["duration"]} {arguments["unit"]} timer{label} is running.'
    return {'status': 'running', 'timer_id': timer_id}, answer

  if name == 'convert_units':
    result = round(_convert(arguments['value'], arguments['from_unit'], arguments['to_unit']), 2)
    answer = f'{arguments["value"]} {arguments["from_unit"]} is {result} {arguments["to_unit"]}.'
    return {'result': result, 'unit': arguments['to_unit']}, answer

  if name == 'send_message':
    channel = arguments.get('channel', 'sms')
    answer = f'Done: I sent your message to {arguments["recipient"]} by {channel}.'
    return {'channel': channel, 'status': 'sent'}, answer

  if name == 'create_event':
    event_id = f'evt-{rng.randint(1000, 9999)}'
    answer = f'"{arguments["title"]}" is on your calendar for {arguments["date"]} at {arguments["start_time"]}.'
    return {'event_id': event_id, 'status': 'created'}, answer

  if name == 'search_flights':
    count = rng.randint(1, 4)
    price = rng.randint(90, 1500)
    code = _pick(rng, ['AF', 'BA', 'LH', 'UA', 'JL', 'QF', 'KL']) + str(rng.randint(100, 999))
    departure = f'{rng.randint(6, 22):02d}:{_pick(rng, [0, 15, 30, 45]):02d}'
    response = {'cheapest': {'departure': departure, 'flight': code, 'price_usd': price}, 'count': count}
    answer = f'The cheapest of {count} is {code} at {price} USD, leaving at {departure}.'

    return response, answer

  raise ValueError(f'no tool response is defined for the tool {name!r}')


# ---------------------------------------------------------------------------
# Records.


def _request_key(text: str) -> str:
  """Return the key under which requests count as duplicates: lower-case words only."""
  return ' '.join(re.findall(r'\w+', text.lower()))


def _declared_tools(rng: random.Random, request: _Request, num_tools: int) -> list[dict[str, Any]]:
  """Pick `num_tools` specs: the needed tool (if any) and random others, shuffled."""
  names = [request.call[0]] if request.call else []
  others = [name for name in _TOOLS_BY_NAME if name not in names]
  names += rng.sample(others, num_tools - len(names))
  rng.shuffle(names)
  return [_TOOLS_BY_NAME[name] for name in names]


def _record(rng: random.Random, request: _Request, *, with_response: bool, num_tools: int) -> dict[str, Any]:
  messages: list[dict[str, Any]] = [{'role': 'user', 'content': request.text}]
  if request.call is None:
    messages.append({'role': 'model', 'content': request.answer})
  else:
    name, arguments = request.call
    messages.append({'role': 'model', 'tool_calls': [{'function': {'name': name, 'arguments': arguments}}]})
    if with_response:
      response, answer = _response_and_answer(rng, name, arguments)
      messages.append({'role': 'tool', 'name': name, 'content': response})
      messages.append({'role': 'model', 'content': answer})
  return {'messages': messages, 'tools': _declared_tools(rng, request, num_tools)}


def generate_records(
    *,
    seed: int,
    count: int,
    num_tools: int = DEFAULT_NUM_TOOLS,
    exclude: set[str] | None = None,
    response_fraction: float = 0.2,
    shares: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
  """Draw `count` records whose request texts are pairwise distinct.

  Args:
    seed: Seed of the draw; the same seed gives the same records.
    count: Number of records.
    num_tools: Tools each record declares: the one its request needs and
      random others, in random order.
    exclude: Request keys (`_request_key`) not to produce; the keys of the
      new records are added to it.
    response_fraction: Share of tool-calling records that go on with the
      tool response and a final answer.
    shares: Relative share of each kind of request, by generator function
      name (`TRAINING_SHARES`); None gives every tool an even share.

  Raises:
    ValueError: the templates cannot produce `count` distinct requests.
  """
  if not 1 <= num_tools <= len(TOOLS):
    raise ValueError(f'num_tools={num_tools} must be in [1, {len(TOOLS)}]')
  rng = random.Random(seed)
  used = exclude if exclude is not None else set()
  generators = [generator for generator, _ in _GENERATORS]
  if shares is None:
    weights = [share for _, share in _GENERATORS]
  else:
    weights = [shares[generator.__name__] for generator in generators]
  records = []
  attempts = 0
  while len(records) < count:
    attempts += 1
    if attempts > 20 * count + 1000:
      raise ValueError(
          f'drew {attempts} requests but only {len(records)} of the {count}'
          ' requested were new; ask for fewer examples'
      )
    request = rng.choices(generators, weights)[0](rng)
    key = _request_key(request.text)
    if key in used:
      continue
    used.add(key)
    with_response = rng.random() < response_fraction
    records.append(_record(rng, request, with_response=with_response, num_tools=num_tools))
  return records


class DatasetPaths(NamedTuple):
  train: Path
  heldout: Path


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
  tmp_path = path.with_name(path.name + '.tmp')
  with open(tmp_path, 'w', encoding='utf-8') as file:
    for record in records:
      file.write(json.dumps(record, ensure_ascii=False) + '\n')
  os.replace(tmp_path, path)


def make_tool_calling_dataset(
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    num_train: int,
    num_heldout: int,
    num_tools: int = DEFAULT_NUM_TOOLS,
) -> DatasetPaths:
  """Write `train.jsonl` and `heldout.jsonl` of tool-calling conversations.

  The held-out records are drawn first, so for a seed they do not depend on
  `num_train`. No training request equals a held-out one (compared by
  `_request_key`: case, punctuation and spacing ignored).

  Args:
    out_dir: Directory of the two files; created if missing.
    seed: Seed of the draw; the same arguments give byte-identical files.
    num_train: Training records.
    num_heldout: Held-out records.
    num_tools: Tools each record declares (see `generate_records`).

  Returns:
    The paths of the two files.
  """
  if num_train < 1 or num_heldout < 0:
    raise ValueError(f'num_train={num_train} must be positive and num_heldout={num_heldout} non-negative')
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  used: set[str] = set()
  # Held-out conversations end at the first model turn, which is what the
  # evaluation answers and scores.
  heldout = generate_records(
      seed=seed * 2 + 1, count=num_heldout, num_tools=num_tools, exclude=used, response_fraction=0.0
  )
  train = generate_records(
      seed=seed * 2, count=num_train, num_tools=num_tools, exclude=used, shares=TRAINING_SHARES
  )

  paths = DatasetPaths(train=out_dir / 'train.jsonl', heldout=out_dir / 'heldout.jsonl')
  _write_jsonl(paths.train, train)
  _write_jsonl(paths.heldout, heldout)
  return paths


# ---------------------------------------------------------------------------
# The demo run.


def prepare_run(run):
  """Write the demo's data and tokenizer and point a run config at them.

  Writes `train.jsonl`, `heldout.jsonl` and `tokenizer.model` (trained on
  the training file) into `run.workdir/data`, from `run.seed` and the
  `run.demo_data` fields, and returns a copy of `run` whose `data.train`,
  `data.eval` and `tokenizer` name them. Both steps are deterministic, so
  when the directory already contains the files of the same settings (a
  resumed run) they are kept as they are.

  Raises:
    ValueError: `run.demo` names no known demo, `run.workdir` is empty, or
      the directory holds demo files of other settings.
  """
  # pylint: disable=g-import-not-at-top
  from gemma4_jax.text.train_tokenizer import train_tokenizer
  # pylint: enable=g-import-not-at-top

  if run.demo != 'tool_calling':
    raise ValueError(f"demo={run.demo!r} is not a known demo; use 'tool_calling' or ''")
  if not run.workdir:
    raise ValueError('the demo needs a workdir: pass --config.workdir=DIR')
  options = {'seed': run.seed, **run.demo_data.to_dict()}
  data_dir = Path(run.workdir) / 'data'
  options_path = data_dir / 'demo_options.json'
  paths = DatasetPaths(train=data_dir / 'train.jsonl', heldout=data_dir / 'heldout.jsonl')
  tokenizer_path = data_dir / 'tokenizer.model'
  ready = options_path.exists() and tokenizer_path.exists() and paths.train.exists() and paths.heldout.exists()
  if options_path.exists():
    saved = json.loads(options_path.read_text(encoding='utf-8'))
    if saved != options:
      raise ValueError(
          f'{data_dir} contains demo data made with {saved}, not {options}; use a new'
          ' --config.workdir or delete that directory'
      )
  if not ready:
    paths = make_tool_calling_dataset(
        data_dir,
        seed=run.seed,
        num_train=run.demo_data.num_train,
        num_heldout=run.demo_data.num_heldout,
        num_tools=run.demo_data.num_tools,
    )
    train_tokenizer(paths.train, tokenizer_path, vocab_size=run.demo_data.vocab_size, seed=run.seed)
    # Written last: its presence means the three files above are complete.
    tmp_path = options_path.with_name(options_path.name + '.tmp')
    tmp_path.write_text(json.dumps(options, sort_keys=True), encoding='utf-8')
    os.replace(tmp_path, options_path)
  prepared = run.copy_and_resolve_references()
  prepared.data.train = str(paths.train)
  prepared.data.eval = str(paths.heldout)
  prepared.tokenizer = str(tokenizer_path)
  return prepared
