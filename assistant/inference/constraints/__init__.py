"""Structured output: a reply constrained to JSON, or to a JSON Schema.

- ``response_format``: :func:`parse_response_format` checks a request's
  ``response_format`` (OpenAI's shape) and builds its grammar once;
  :class:`ResponseFormat` is the checked value (``to_openai()`` gives the
  shape back, for a backend that forwards it instead of constraining).
- ``grammar``: :func:`constraint_for` makes the :class:`Constraint` of one
  reply over the backend's vocabulary (llguidance, from the ``Backend``
  interface alone).

The constraint is applied in ``assistant.inference.sampling.Sampler``, the
one place every decode loop samples through, so it holds on every backend
and with speculative decoding (a draft token the grammar rejects ends the
draft; see ``speculative.engine``).
"""

from assistant.inference.constraints.grammar import Constraint, constraint_for, tokenizer_for
from assistant.inference.constraints.response_format import (MAX_DEPTH, TYPES, ConstraintError, ResponseFormat,
                                                              parse_response_format)

__all__ = ["Constraint", "ConstraintError", "MAX_DEPTH", "ResponseFormat", "TYPES", "constraint_for",
           "parse_response_format", "tokenizer_for"]
