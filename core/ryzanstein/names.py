"""What a user-given name or id may look like, checked with full matches.

`re.match(r"...$")` also accepts a trailing newline (`$` matches before it), which once let "abc\n" become a
model folder; every check here uses `fullmatch`, so the whole string must fit the pattern."""

from __future__ import annotations

import re

# Models and adapters: lowercase, digits, '.', '_' or '-', starting with a letter or digit, at most 64.
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Fine-tune jobs: "ft-<date>-<time>-<adapter name>" (the folder name under finetune/).
FINETUNE_JOB_ID = re.compile(r"ft-[0-9]{8}-[0-9]{6}-[a-z0-9][a-z0-9._-]{0,63}")
NAME_RULE = "use lowercase letters, digits, '.', '_' or '-' (at most 64 characters, starting with a letter or digit)"


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def is_finetune_job_id(value: object) -> bool:
    return isinstance(value, str) and FINETUNE_JOB_ID.fullmatch(value) is not None
