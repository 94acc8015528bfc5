"""Answer checkers for the task families of the shipped demo data: one function per family,
`check_<family>(reply, answer) -> bool`, and `check(family, reply, answer)` to dispatch.

Each data row carries `family` and `answer` columns; `answer` is a string whose meaning the family
defines:

* `arithmetic`, `word_problem`, `unit_convert` -- answer `"135"`: the reply's last number (digits,
  `1,000`, or number words) equals it.
* `yes_no_check` -- `"yes"` / `"no"`: the reply's first standalone "yes" or "no" is it.
* `fact` -- `"Canberra"`, `"seven"`: the reply contains it as whole words (case-insensitive; number
  words and digits are the same).
* `letter_case` -- `"upper:yellow"` / `"lower:yellow"`: every letter of the reply has that case, and
  it contains the word.
* `one_word` -- `"word:Honey"`: the reply is that one word; `"sentence:Honey"`: a sentence of three
  or more words containing it.
* `list_count` -- `"3"`: the reply lists exactly that many distinct items of at most four words
  (comma / "and" separated, or one bullet per line).

The rules are strict on purpose: a reply is judged by what a user asked for, not by how close it
comes. They are tested on every shipped pair (the chosen answer passes, the rejected one fails).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ONES = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90,
}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1000}
_NUMBER_WORD = "|".join([*_ONES, *_TENS, *_SCALES, "and"])
# A run of number words ("one hundred and eight", "twenty-one") or a numeral ("1,000", "-3", "2.5").
_NUMBER = re.compile(
    rf"(?<![\w.])-?\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?(?!\w)|(?<![\w.])-?\d+(?:\.\d+)?(?!\w)"
    rf"|\b(?:{_NUMBER_WORD})(?:[\s-]+(?:{_NUMBER_WORD}))*\b",
    re.IGNORECASE,
)


def _words_to_int(text: str) -> int | None:
    """`"one hundred and eight"` -> 108; None if the run holds no number word (only "and")."""
    total, current, seen = 0, 0, False
    for word in re.split(r"[\s-]+", text.lower()):
        if word in _ONES:
            current, seen = current + _ONES[word], True
        elif word in _TENS:
            current, seen = current + _TENS[word], True
        elif word in _SCALES:
            current, seen = max(current, 1) * _SCALES[word], True
            if word == "thousand":
                total, current = total + current, 0
    return total + current if seen else None


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, in order: numerals (with thousands separators) and runs of number words."""
    out: list[float] = []
    for match in _NUMBER.finditer(text):
        token = match.group(0)
        if token[0].isdigit() or token[0] == "-":
            out.append(float(token.replace(",", "")))
        else:
            value = _words_to_int(token)
            if value is not None:
                out.append(float(value))
    return out


def _words(text: str) -> list[str]:
    """Lower-case words and numerals ("-18.0" is one numeral, "18.0", so it never matches "0")."""
    return re.findall(r"\d+(?:[.,]\d+)*|[a-z]+(?:'[a-z]+)?", text.lower())


def _normalise_numbers(words: list[str]) -> list[str]:
    return [str(_ONES.get(w, _TENS.get(w, w))) for w in words]


def _contains_words(text: str, phrase: str, *, plural: bool = False) -> bool:
    """Whether `phrase` occurs in `text` as whole words (case-insensitive, "seven" == "7"); with
    `plural`, its last word may end in "s" / "es"."""
    hay = _normalise_numbers(_words(text))
    needle = _normalise_numbers(_words(phrase))
    if not needle:
        return False
    for i in range(len(hay) - len(needle) + 1):
        head, last, want = hay[i : i + len(needle) - 1], hay[i + len(needle) - 1], needle[-1]
        if head == needle[:-1] and (last == want or (plural and last in (want + "s", want + "es"))):
            return True
    return False


def check_number(reply: str, answer: str) -> bool:
    """The reply's last number equals `answer` (GSM8K-style final-answer extraction)."""
    found = numbers_in(reply)
    return bool(found) and abs(found[-1] - float(answer)) < 1e-9


def check_yes_no(reply: str, answer: str) -> bool:
    """The first standalone "yes" / "no" of the reply is `answer`."""
    match = re.search(r"\b(yes|no)\b", reply, re.IGNORECASE)
    return match is not None and match.group(1).lower() == answer.strip().lower()


def check_fact(reply: str, answer: str) -> bool:
    """The reply names the answer (whole words, case-insensitive, number words == digits)."""
    return _contains_words(reply, answer)


def _form_and_word(answer: str, forms: tuple[str, ...]) -> tuple[str, str]:
    form, _, word = answer.partition(":")
    if form not in forms or not word:
        raise ValueError(f"answer {answer!r}: expected '<{'|'.join(forms)}>:<word>'")
    return form, word


def check_letter_case(reply: str, answer: str) -> bool:
    """`upper:<word>` / `lower:<word>`: every letter of the reply has that case, and it contains the word."""
    form, word = _form_and_word(answer, ("upper", "lower"))
    letters = [c for c in reply if c.isalpha()]
    if not letters:
        return False
    cased = all(c.isupper() for c in letters) if form == "upper" else all(c.islower() for c in letters)
    return cased and _contains_words(reply, word, plural=True)


def check_one_word(reply: str, answer: str) -> bool:
    """`word:<w>`: the reply is that one word (punctuation aside); `sentence:<w>`: a sentence of at
    least three words that contains it."""
    form, word = _form_and_word(answer, ("word", "sentence"))
    words = _words(reply)
    if form == "word":
        return words == _words(word)
    return len(words) >= 3 and _contains_words(reply, word, plural=True)


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")
_BULLET_MARK = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


def list_items(reply: str) -> list[str]:
    """Items of a list reply: one per bullet / numbered line when there are two or more such lines,
    else the comma / semicolon / "and" / "or" separated parts of the text after its last colon."""
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    bullets = [_BULLET_MARK.sub("", line) for line in lines if _BULLET.match(line)]
    if len(bullets) >= 2:
        parts = bullets
    else:
        text = reply.strip().rsplit(":", 1)[-1]
        parts = re.split(r",|;|\band\b|\bor\b", text)
    return [p.strip().strip(".!").strip() for p in parts if p.strip().strip(".!").strip()]


def count_items(reply: str) -> int:
    return len(list_items(reply))


def check_list_count(reply: str, answer: str) -> bool:
    """The reply lists exactly `answer` items, each distinct and at most four words long (a list, not
    sentences)."""
    items = list_items(reply)
    short = all(len(item.split()) <= 4 for item in items)
    distinct = len({item.lower() for item in items}) == len(items)
    return len(items) == int(answer) and short and distinct


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "arithmetic": check_number,
    "word_problem": check_number,
    "unit_convert": check_number,
    "yes_no_check": check_yes_no,
    "fact": check_fact,
    "letter_case": check_letter_case,
    "one_word": check_one_word,
    "list_count": check_list_count,
}


def check(family: str, reply: str, answer: str) -> bool:
    """Whether `reply` answers a prompt of `family` correctly (see the module docstring)."""
    try:
        checker = CHECKERS[family]
    except KeyError:
        raise ValueError(f"unknown task family {family!r} (known: {', '.join(sorted(CHECKERS))})") from None
    return checker(reply, answer)


def task_reward(
    prompts: list[str], completions: list[str], family: list[str], answer: list[str], **_: object
) -> list[float | None]:
    """TRL-style reward function: 1.0 for a correct completion, 0.0 otherwise, None for rows of a
    family without a checker (ignored in a weighted sum of rewards)."""
    return [
        (1.0 if check(f, c, a) else 0.0) if f in CHECKERS else None
        for c, f, a in zip(completions, family, answer, strict=True)
    ]
