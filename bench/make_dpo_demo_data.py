"""Generate the shipped DPO demo preference data: ``jaxrlhf/assets/dpo_demo/{train,test}.jsonl``.

Every pair has an objectively better answer (checkable arithmetic, a fact, or a checkable
instruction), and the rejected answer is fluent and in the same style as the chosen one, so
a model has to learn correctness / instruction following, not length or style. Eight task
families, 40 train + 8 held-out pairs each (320 / 64):

* ``arithmetic``    -- "What is 37 + 48?"; chosen has the right result, rejected a plausible slip
  (carry, off by one, swapped digits, one group too many/few).
* ``word_problem``  -- one-step story problems (+, -, x, /) with a one-line working.
* ``unit_convert``  -- "How many minutes are in 7 hours?"; rejected uses a wrong factor or
  multiplies wrongly.
* ``yes_no_check``  -- "Is 51 an even number? Answer yes or no."; "Yes." vs "No." (balanced).
* ``fact``          -- capitals and unambiguous facts; rejected is confidently wrong. Held-out
  facts are facts absent from training.
* ``letter_case``   -- "Reply in all capital/lowercase letters."; rejected is the same sentence
  in the wrong case (normal case, or the opposite instruction's case).
* ``one_word``      -- "Answer in one word" vs "Answer in a full sentence"; rejected gives the
  other form, so neither the shorter nor the longer answer is always preferred.
* ``list_count``    -- "List exactly three colors."; rejected lists one item too many or too
  few. Held-out pairs use categories absent from training.

Held-out prompts never occur in training (asserted); for the bank-based families (``fact``,
``letter_case``, ``one_word``, ``list_count``) the held-out questions / categories are disjoint
from the training ones too.

    python bench/make_dpo_demo_data.py            # writes the two files
    python bench/make_dpo_demo_data.py --stats    # also prints token statistics (SmolLM2 tokenizer)
    python bench/make_dpo_demo_data.py --check    # verifies the committed files match

Deterministic: one seeded ``random.Random`` per family; output is byte-identical across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable

SEED = 20240611
N_TRAIN = 40  # per family: the first training pairs (unchanged since the first data release)
N_EXTRA = 40  # per family: more training pairs, drawn after everything else (the held-out set is unchanged)
N_TEST = 8  # per family
OUT_DIR = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jaxrlhf", "assets", "dpo_demo")
)

Pair = tuple[str, str, str, str]  # (prompt, chosen, rejected, answer for jaxrlhf.evaluation.checkers)

# --------------------------------------------------------------------------------------- helpers


def _wrong_sum(rng: random.Random, c: int) -> int:
    """A plausible slip for an addition/subtraction result."""
    options = [c + 1, c - 1, c + 10, c - 10]
    if c >= 10 and c % 10 != c // 10 % 10:
        options.append(int(str(c)[::-1]) if c < 100 else c + 10)
    return rng.choice([o for o in options if o > 0 and o != c])


def _wrong_product(rng: random.Random, a: int, b: int) -> int:
    c = a * b
    options = [c + a, c - a, c + b, c - b, c + 10, c - 10, c + 1]
    return rng.choice([o for o in options if o > 0 and o != c])


# ------------------------------------------------------------------------------------ arithmetic


def arithmetic(rng: random.Random) -> Callable[[], Pair]:
    def make() -> Pair:
        op = rng.choice(["+", "-", "x"])
        if op == "+":
            a, b = rng.randint(12, 89), rng.randint(12, 89)
            c = a + b
            wrong = _wrong_sum(rng, c)
            sym, phrase = "+", rng.choice(["What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}."])
        elif op == "-":
            a = rng.randint(30, 99)
            b = rng.randint(11, a - 5)
            c = a - b
            wrong = _wrong_sum(rng, c)
            sym, phrase = "-", rng.choice(
                ["What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}."]
            )
        else:
            a, b = rng.randint(3, 9), rng.randint(4, 19)
            c = a * b
            wrong = _wrong_product(rng, a, b)
            sym = "x"
            phrase = rng.choice(["What is {a} times {b}?", "Calculate {a} x {b}.", "Multiply {a} by {b}."])
        prompt = phrase.format(a=a, b=b)
        style = rng.choice(
            ["{a} {s} {b} = {c}, so the answer is {c}.", "{a} {s} {b} = {c}. The answer is {c}."]
        )
        return (
            prompt,
            style.format(a=a, s=sym, b=b, c=c),
            style.format(a=a, s=sym, b=b, c=wrong),
            str(c),
        )

    return make


# ---------------------------------------------------------------------------------- word problems

NAMES = [
    ("Mia", "she", "her"), ("Sam", "he", "his"), ("Leo", "he", "his"), ("Ana", "she", "her"),
    ("Ben", "he", "his"), ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lily", "she", "her"),
    ("Noah", "he", "his"), ("Emma", "she", "her"), ("Ravi", "he", "his"), ("Yuki", "she", "her"),
]  # fmt: skip
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "balloons"]


def word_problem(rng: random.Random) -> Callable[[], Pair]:
    def make() -> Pair:
        name, he, _ = rng.choice(NAMES)
        item = rng.choice(ITEMS)
        kind = rng.choice(["buy", "give", "boxes", "share"])
        if kind == "buy":
            a, b = rng.randint(5, 40), rng.randint(3, 25)
            c, sym = a + b, "+"
            wrong = _wrong_sum(rng, c)
            prompt = f"{name} has {a} {item} and gets {b} more. How many {item} does {he} have now?"
            tail = f"so {name} has {{c}} {item} now."
        elif kind == "give":
            a = rng.randint(15, 60)
            b = rng.randint(3, a - 4)
            c, sym = a - b, "-"
            wrong = _wrong_sum(rng, c)
            prompt = f"{name} had {a} {item} and gave {b} away. How many {item} are left?"
            tail = f"so {name} has {{c}} {item} left."
        elif kind == "boxes":
            a, b = rng.randint(2, 9), rng.randint(3, 12)
            c, sym = a * b, "x"
            wrong = _wrong_product(rng, a, b)
            prompt = f"{name} has {a} bags with {b} {item} in each bag. How many {item} are there in total?"
            tail = f"so there are {{c}} {item} in total."
        else:
            b, c = rng.randint(2, 8), rng.randint(2, 9)
            a, sym = b * c, "/"
            wrong = rng.choice([o for o in (c + 1, c - 1, c + 2) if o > 0])
            prompt = (
                f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
            )
            tail = f"so each friend gets {{c}} {item}."
        line = f"{a} {sym} {b} = {{c}}, " + tail
        return prompt, line.format(c=c), line.format(c=wrong), str(c)

    return make


# ------------------------------------------------------------------------------- unit conversion

# (big unit plural, small unit plural, true factor, wrong factor)
CONVERSIONS = [
    ("hours", "minutes", 60, 100),
    ("minutes", "seconds", 60, 100),
    ("days", "hours", 24, 12),
    ("weeks", "days", 7, 5),
    ("years", "months", 12, 10),
    ("meters", "centimeters", 100, 10),
    ("kilometers", "meters", 1000, 100),
    ("kilograms", "grams", 1000, 100),
    ("liters", "milliliters", 1000, 100),
    ("feet", "inches", 12, 10),
    ("dozens", "eggs", 12, 10),
    ("centuries", "years", 100, 1000),
]
SINGULAR = {
    "hours": "hour", "minutes": "minute", "days": "day", "weeks": "week", "years": "year",
    "meters": "meter", "kilometers": "kilometer", "kilograms": "kilogram", "liters": "liter",
    "feet": "foot", "dozens": "dozen", "centuries": "century",
}  # fmt: skip


def unit_convert(rng: random.Random) -> Callable[[], Pair]:
    def make() -> Pair:
        big, small, f, bad_f = rng.choice(CONVERSIONS)
        n = rng.randint(2, 12)
        phrase = rng.choice(["How many {s} are in {n} {b}?", "Convert {n} {b} to {s}."])
        if big == "dozens":
            phrase = "How many eggs are in {n} dozen?"
        prompt = phrase.format(s=small, n=n, b=big if big != "dozens" else "dozen")
        big_txt = big if big != "dozens" else "dozen"
        one = SINGULAR[big]
        line = "1 {one} is {f} {s}, so {n} {b} is {v} {s}."
        chosen = line.format(one=one, f=f, s=small, n=n, b=big_txt, v=n * f)
        if rng.random() < 0.5:  # wrong fact, consistent arithmetic
            rejected = line.format(one=one, f=bad_f, s=small, n=n, b=big_txt, v=n * bad_f)
        else:  # right fact, arithmetic slip
            v = rng.choice([(n + 1) * f, (n - 1) * f])
            rejected = line.format(one=one, f=f, s=small, n=n, b=big_txt, v=v)
        return prompt, chosen, rejected, str(n * f)

    return make


# ---------------------------------------------------------------------------------- yes/no checks


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def yes_no_check(rng: random.Random) -> Callable[[], Pair]:
    state = {"k": 0}

    def make() -> Pair:
        want = state["k"] % 2 == 0  # alternate so "Yes." and "No." are each chosen half the time
        state["k"] += 1
        while True:
            kind = rng.choice(["even", "odd", "greater", "less", "divisible", "prime", "sum"])
            if kind == "even":
                n = rng.randint(10, 99)
                q, truth = f"Is {n} an even number?", n % 2 == 0
            elif kind == "odd":
                n = rng.randint(10, 99)
                q, truth = f"Is {n} an odd number?", n % 2 == 1
            elif kind == "greater":
                a, b = rng.sample(range(10, 100), 2)
                q, truth = f"Is {a} greater than {b}?", a > b
            elif kind == "less":
                a, b = rng.sample(range(10, 100), 2)
                q, truth = f"Is {a} less than {b}?", a < b
            elif kind == "divisible":
                d = rng.choice([3, 4, 5, 6, 9, 10])
                n = rng.randint(12, 99)
                q, truth = f"Is {n} divisible by {d}?", n % d == 0
            elif kind == "prime":
                n = rng.randint(2, 50)
                q, truth = f"Is {n} a prime number?", _is_prime(n)
            else:
                a, b = rng.randint(5, 50), rng.randint(5, 50)
                c = a + b if rng.random() < 0.5 else a + b + rng.choice([-2, -1, 1, 2, 10])
                q, truth = f"Is {a} + {b} equal to {c}?", a + b == c
            if truth == want:
                break
        prompt = q + rng.choice([" Answer yes or no.", " Answer with yes or no only."])
        yes, no = "Yes.", "No."
        return (prompt, yes, no, "yes") if truth else (prompt, no, yes, "no")

    return make


# ------------------------------------------------------------------------------------------ facts

# (country, capital, another big city); FACTS: (question, correct sentence, wrong sentence, answer)
CAPITALS = [
    ("France", "Paris", "Marseille"), ("Germany", "Berlin", "Munich"), ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"), ("Japan", "Tokyo", "Osaka"), ("China", "Beijing", "Shanghai"),
    ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"),
    ("Brazil", "Brasilia", "Rio de Janeiro"), ("India", "New Delhi", "Mumbai"),
    ("Russia", "Moscow", "Saint Petersburg"), ("Egypt", "Cairo", "Alexandria"),
    ("Turkey", "Ankara", "Istanbul"), ("the United Kingdom", "London", "Manchester"),
    ("Portugal", "Lisbon", "Porto"), ("Greece", "Athens", "Thessaloniki"),
    ("Belgium", "Brussels", "Antwerp"), ("Sweden", "Stockholm", "Gothenburg"),
    ("Norway", "Oslo", "Bergen"), ("Poland", "Warsaw", "Krakow"), ("Austria", "Vienna", "Salzburg"),
    ("Ireland", "Dublin", "Cork"), ("Mexico", "Mexico City", "Guadalajara"),
    ("Argentina", "Buenos Aires", "Cordoba"), ("Kenya", "Nairobi", "Mombasa"),
    ("Nigeria", "Abuja", "Lagos"), ("South Korea", "Seoul", "Busan"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Thailand", "Bangkok", "Chiang Mai"), ("Morocco", "Rabat", "Casablanca"),
    ("New Zealand", "Wellington", "Auckland"), ("Pakistan", "Islamabad", "Karachi"),
    ("Finland", "Helsinki", "Tampere"), ("Denmark", "Copenhagen", "Aarhus"),
    ("Hungary", "Budapest", "Debrecen"), ("Peru", "Lima", "Cusco"), ("Colombia", "Bogota", "Medellin"),
    ("Chile", "Santiago", "Valparaiso"), ("Saudi Arabia", "Riyadh", "Jeddah"), ("Iran", "Tehran", "Isfahan"),
]  # fmt: skip
FACTS = [
    ("How many days are in a week?", "There are seven days in a week.", "There are eight days in a week.",
     "seven"),
    ("How many months are in a year?", "There are twelve months in a year.",
     "There are ten months in a year.", "twelve"),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs.", "eight"),
    ("How many legs does an insect have?", "An insect has six legs.", "An insect has eight legs.", "six"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
     "The chemical symbol for gold is Ag.", "Au"),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe.",
     "The chemical symbol for iron is Ir.", "Fe"),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.",
     "Venus is the planet closest to the Sun.", "Mercury"),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "Saturn is the largest planet in our solar system.", "Jupiter"),
    ("At what temperature in Celsius does water freeze?", "Water freezes at 0 degrees Celsius.",
     "Water freezes at 10 degrees Celsius.", "0"),
    ("At what temperature in Celsius does water boil at sea level?",
     "At sea level, water boils at 100 degrees Celsius.", "At sea level, water boils at 90 degrees Celsius.",
      "100"),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "A hexagon has eight sides.", "six"),
    ("How many sides does an octagon have?", "An octagon has eight sides.", "An octagon has six sides.",
     "eight"),
    ("How many sides does a triangle have?", "A triangle has three sides.", "A triangle has four sides.",
     "three"),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.",
     "Plants absorb helium from the air.", "carbon dioxide"),
    ("How many hours are in a day?", "There are 24 hours in a day.", "There are 12 hours in a day.", "24"),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.",
     "There are 100 minutes in an hour.", "60"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.",
     "The Atlantic Ocean is the largest ocean on Earth.", "Pacific"),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.",
     "Romeo and Juliet was written by Charles Dickens.", "Shakespeare"),
    ("How many days are in a leap year?", "A leap year has 366 days.", "A leap year has 365 days.", "366"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.",
     "Jupiter is known as the Red Planet.", "Mars"),
    ("How many strings does a standard violin have?", "A standard violin has four strings.",
     "A standard violin has six strings.", "four"),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "A bicycle has three wheels.",
     "two"),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.",
     "Mixing blue and yellow gives purple.", "green"),
    ("What is the largest mammal on Earth?", "The blue whale is the largest mammal on Earth.",
     "The elephant is the largest mammal on Earth.", "blue whale"),
    ("What is the square root of 81?", "The square root of 81 is 9.", "The square root of 81 is 8.", "9"),
    ("How many players does a soccer team have on the field?",
     "A soccer team has eleven players on the field.", "A soccer team has nine players on the field.",
      "eleven"),
    ("What is the highest mountain on Earth above sea level?",
     "Mount Everest is the highest mountain above sea level.", "K2 is the highest mountain above sea level.",
      "Everest"),
    ("How many centimeters are in a meter?", "There are 100 centimeters in a meter.",
     "There are 1000 centimeters in a meter.", "100"),
]  # fmt: skip


def fact_bank() -> list[Pair]:
    bank = [
        (f"What is the capital of {c}?", f"The capital of {c} is {cap}.", f"The capital of {c} is {bad}.",
         cap)
        for c, cap, bad in CAPITALS
    ]
    bank += FACTS
    return bank


# ---------------------------------------------------------------------- letter case and one word

# (question, one-word answer, full-sentence answer)
SIMPLE_QA = [
    ("What animal barks?", "Dog", "A dog is the animal that barks."),
    ("What color is the sky on a clear day?", "Blue", "The sky is blue on a clear day."),
    ("What do bees make?", "Honey", "Bees make honey."),
    ("What color is fresh grass?", "Green", "Fresh grass is green."),
    ("What is frozen water called?", "Ice", "Frozen water is called ice."),
    ("What do you call a baby cat?", "Kitten", "A baby cat is called a kitten."),
    ("What do you call a baby dog?", "Puppy", "A baby dog is called a puppy."),
    ("What is the opposite of cold?", "Hot", "The opposite of cold is hot."),
    ("What is the opposite of up?", "Down", "The opposite of up is down."),
    ("What is the opposite of day?", "Night", "The opposite of day is night."),
    ("What is the opposite of big?", "Small", "The opposite of big is small."),
    ("Which fruit is long, yellow and curved?", "Banana", "A banana is long, yellow and curved."),
    ("What do we use to see?", "Eyes", "We use our eyes to see."),
    ("What do we use to hear?", "Ears", "We use our ears to hear."),
    ("What season comes after winter?", "Spring", "Spring comes after winter."),
    ("What season comes after summer?", "Autumn", "Autumn comes after summer."),
    ("Which planet do we live on?", "Earth", "We live on the planet Earth."),
    ("What do fish live in?", "Water", "Fish live in water."),
    ("What color is fresh snow?", "White", "Fresh snow is white."),
    ("What do you call a baby cow?", "Calf", "A baby cow is called a calf."),
    ("What do you call a young sheep?", "Lamb", "A young sheep is called a lamb."),
    ("Which farm animal says moo?", "Cow", "The cow is the farm animal that says moo."),
    ("What is the largest land animal?", "Elephant", "The elephant is the largest land animal."),
    ("What do you write with on a blackboard?", "Chalk", "You write on a blackboard with chalk."),
    ("What color is a ripe tomato?", "Red", "A ripe tomato is red."),
    ("What is the first meal of the day called?", "Breakfast", "The first meal of the day is breakfast."),
    ("What does a thermometer measure?", "Temperature", "A thermometer measures temperature."),
    ("What tool do you use to cut paper?", "Scissors", "You use scissors to cut paper."),
    ("Which star does Earth orbit?", "Sun", "Earth orbits the Sun."),
    ("What is the natural satellite of Earth?", "Moon", "The Moon is the natural satellite of Earth."),
    ("What do spiders spin?", "Webs", "Spiders spin webs."),
    ("What is a house made of snow blocks called?", "Igloo", "A house made of snow blocks is an igloo."),
    ("What color are ripe lemons?", "Yellow", "Ripe lemons are yellow."),
    ("Which instrument has black and white keys?", "Piano", "The piano has black and white keys."),
    ("What day comes after Friday?", "Saturday", "The day after Friday is Saturday."),
    ("What month comes after March?", "April", "April comes after March."),
    ("What is a doctor for animals called?", "Veterinarian",
     "A doctor for animals is called a veterinarian."),
    ("What do you use to unlock a door?", "Key", "You use a key to unlock a door."),
    ("Which gas do humans need to breathe?", "Oxygen", "Humans need oxygen to breathe."),
    ("What is water falling from clouds called?", "Rain", "Water falling from clouds is called rain."),
    ("What shape has three sides?", "Triangle", "A shape with three sides is a triangle."),
    ("What do hens lay?", "Eggs", "Hens lay eggs."),
    ("Which body part do you use to smell?", "Nose", "You use your nose to smell."),
    ("What do you call a baby frog?", "Tadpole", "A baby frog is called a tadpole."),
    ("Which animal is called the king of the jungle?", "Lion", "The lion is called the king of the jungle."),
    ("Where can you borrow books for free?", "Library", "You can borrow books for free at a library."),
    ("What is the hardest natural material?", "Diamond", "Diamond is the hardest natural material."),
    ("What do cows drink?", "Water", "Cows drink water."),
    ("What color is coal?", "Black", "Coal is black."),
    ("Which month has the fewest days?", "February", "February has the fewest days."),
    ("What do you sleep on at night?", "Bed", "At night you sleep on a bed."),
    ("What falls from trees in autumn?", "Leaves", "Leaves fall from trees in autumn."),
    ("What does a baker bake?", "Bread", "A baker bakes bread."),
    ("What falls from the sky as white flakes in winter?", "Snow",
     "Snow falls from the sky as white flakes in winter."),
    ("Which vehicle carries passengers through the air?", "Airplane",
     "An airplane carries passengers through the air."),
]  # fmt: skip


def letter_case(qa: list[tuple[str, str, str]], rng: random.Random) -> list[Pair]:
    out = []
    for q, word, sentence in qa:
        if rng.random() < 0.5:
            instr = rng.choice(["Reply in all capital letters.", "Answer using only capital letters."])
            chosen, case = sentence.upper(), "upper"
            rejected = sentence if rng.random() < 0.5 else sentence.lower()
        else:
            instr = rng.choice(["Reply in all lowercase letters.", "Answer using only lowercase letters."])
            chosen, case = sentence.lower(), "lower"
            rejected = sentence if rng.random() < 0.5 else sentence.upper()
        prompt = f"{instr} {q}" if rng.random() < 0.5 else f"{q} {instr}"
        out.append((prompt, chosen, rejected, f"{case}:{word}"))
    return out


def one_word(qa: list[tuple[str, str, str]], rng: random.Random) -> list[Pair]:
    out = []
    for i, (q, word, sentence) in enumerate(qa):
        if i % 2 == 0:  # half "one word", half "full sentence", so length never decides
            instr = rng.choice(["Answer in one word.", "Answer with a single word."])
            chosen, rejected, form = f"{word}.", sentence, "word"
        else:
            instr = rng.choice(["Answer in a full sentence.", "Answer with a complete sentence."])
            chosen, rejected, form = sentence, f"{word}.", "sentence"
        prompt = f"{instr} {q}" if rng.random() < 0.5 else f"{q} {instr}"
        out.append((prompt, chosen, rejected, f"{form}:{word}"))
    return out


# ------------------------------------------------------------------------------------ list count

CATEGORIES = {
    "colors": ["red", "blue", "green", "yellow", "orange", "purple", "pink", "brown"],
    "fruits": ["apple", "banana", "orange", "grape", "mango", "pear", "cherry", "peach"],
    "vegetables": ["carrot", "potato", "onion", "broccoli", "spinach", "pea", "cabbage", "lettuce"],
    "farm animals": ["cow", "pig", "sheep", "goat", "horse", "chicken", "duck", "donkey"],
    "days of the week": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months of the year": ["January", "March", "May", "June", "August", "October", "December"],
    "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "shapes": ["circle", "square", "triangle", "rectangle", "oval", "hexagon", "star", "diamond"],
    "musical instruments": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp"],
    "sports": ["soccer", "tennis", "basketball", "swimming", "golf", "hockey", "cricket", "rugby"],
    "birds": ["eagle", "sparrow", "parrot", "owl", "penguin", "robin", "crow", "swan"],
    "metals": ["iron", "copper", "gold", "silver", "aluminum", "zinc", "tin", "lead"],
    "body parts": ["hand", "foot", "knee", "elbow", "shoulder", "nose", "ear", "chin"],
    "vehicles": ["car", "bus", "train", "bicycle", "truck", "boat", "plane", "tram"],
    "flowers": ["rose", "tulip", "daisy", "lily", "sunflower", "orchid", "daffodil", "poppy"],
    "drinks": ["water", "milk", "tea", "coffee", "juice", "lemonade", "cocoa", "soda"],
    "school subjects": ["math", "history", "science", "art", "music", "geography", "English", "biology"],
    "pieces of furniture": ["chair", "table", "sofa", "bed", "desk", "shelf", "wardrobe", "stool"],
    "kinds of weather": ["rain", "snow", "wind", "fog", "hail", "sunshine", "thunder", "drizzle"],
    "sea animals": ["shark", "dolphin", "octopus", "whale", "crab", "jellyfish", "seal", "starfish"],
    "trees": ["oak", "pine", "maple", "birch", "willow", "cedar", "palm", "elm"],
    "insects": ["ant", "bee", "beetle", "butterfly", "mosquito", "fly", "moth", "grasshopper"],
    "items of clothing": ["shirt", "jacket", "scarf", "sock", "hat", "dress", "coat", "sweater"],
    "tools": ["hammer", "saw", "wrench", "drill", "screwdriver", "shovel", "rake", "pliers"],
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _render_list(items: list[str]) -> str:
    text = ", ".join(items) + "."
    return text[0].upper() + text[1:]


def list_count(categories: list[str], rng: random.Random) -> Callable[[], Pair]:
    def make() -> Pair:
        cat = rng.choice(categories)
        n = rng.choice(sorted(NUMBER_WORDS))
        phrase = rng.choice(
            ["List exactly {w} {c}.", "Name exactly {w} {c}.", "Give exactly {w} {c}, comma separated."]
        )
        prompt = phrase.format(w=NUMBER_WORDS[n], c=cat)
        items = rng.sample(CATEGORIES[cat], n + 1)
        chosen = _render_list(items[:n])
        wrong_n = n + 1 if rng.random() < 0.5 else n - 1
        rejected = _render_list(items[:wrong_n])
        return prompt, chosen, rejected, str(n)

    return make


# ---------------------------------------------------------------------------------------- driver


def _draw(make: Callable[[], Pair], n: int, seen: set[str]) -> list[Pair]:
    out: list[Pair] = []
    for _ in range(100 * n):
        if len(out) == n:
            return out
        pair = make()
        if pair[0] in seen:
            continue
        seen.add(pair[0])
        out.append(pair)
    raise RuntimeError("could not draw enough distinct prompts")


def _split_bank(bank: list, rng: random.Random, n_test: int) -> tuple[list, list]:
    bank = list(bank)
    rng.shuffle(bank)
    return bank[n_test:], bank[:n_test]


def build() -> dict[str, list[tuple[str, Pair]]]:
    """``{"train": [(family, (prompt, chosen, rejected)), ...], "test": [...]}``, deterministic."""
    splits: dict[str, list[tuple[str, Pair]]] = {"train": [], "test": []}

    def add(family: str, train: list[Pair], test: list[Pair]) -> None:
        assert len(train) == N_TRAIN and len(test) == N_TEST, (family, len(train), len(test))
        splits["train"] += [(family, p) for p in train]
        splits["test"] += [(family, p) for p in test]

    makers: dict[str, tuple[Callable[[], Pair], set[str]]] = {}
    # Generated families: test drawn first, then train from the same distribution, prompts distinct.
    for i, (family, factory) in enumerate(
        [("arithmetic", arithmetic), ("word_problem", word_problem), ("unit_convert", unit_convert),
         ("yes_no_check", yes_no_check)]
    ):  # fmt: skip
        rng = random.Random(SEED + i)
        seen: set[str] = set()
        make = factory(rng)
        test = _draw(make, N_TEST, seen)
        train = _draw(make, N_TRAIN, seen)
        add(family, train, test)
        makers[family] = (make, seen)

    # Facts: held-out facts are facts absent from training.
    rng = random.Random(SEED + 10)
    bank_train, bank_test = _split_bank(fact_bank(), rng, N_TEST)
    add("fact", bank_train[:N_TRAIN], bank_test)

    # Letter case / one word: a disjoint set of held-out questions, shared by the two families.
    rng = random.Random(SEED + 11)
    qa_train, qa_test = _split_bank(SIMPLE_QA, rng, N_TEST + 2)
    assert len(qa_train) >= N_TRAIN
    add(
        "letter_case",
        letter_case(rng.sample(qa_train, N_TRAIN), rng),
        letter_case(rng.sample(qa_test, N_TEST), rng),
    )
    add(
        "one_word",
        one_word(rng.sample(qa_train, N_TRAIN), rng),
        one_word(rng.sample(qa_test, N_TEST), rng),
    )

    # List count: held-out categories absent from training.
    rng = random.Random(SEED + 12)
    cat_train, cat_test = _split_bank(sorted(CATEGORIES), rng, 5)
    seen = set()
    add(
        "list_count",
        _draw(list_count(cat_train, rng), N_TRAIN, seen),
        _draw(list_count(cat_test, rng), N_TEST, seen),
    )

    rng = random.Random(SEED + 99)
    for rows in splits.values():
        rng.shuffle(rows)
    extra = _extra_train(splits, makers, bank_train, qa_train, cat_train)
    splits["train"] = splits["train"] + extra
    random.Random(SEED + 98).shuffle(splits["train"])  # the held-out order above is untouched
    _validate(splits)
    return splits


def _extra_train(
    splits: dict[str, list[tuple[str, Pair]]],
    makers: dict[str, tuple[Callable[[], Pair], set[str]]],
    bank_train: list[Pair],
    qa_train: list[tuple[str, str, str]],
    cat_train: list[str],
) -> list[tuple[str, Pair]]:
    """`N_EXTRA` more training pairs per family, from training material only (training facts,
    questions and categories) and with prompts new to both splits."""
    taken = {p for rows in splits.values() for _, (p, *_) in rows}
    out: list[tuple[str, Pair]] = []

    def fresh(family: str, candidates: Callable[[], list[Pair]]) -> None:
        got: list[Pair] = []
        for _ in range(200):
            for pair in candidates():
                if pair[0] not in taken and len(got) < N_EXTRA:
                    taken.add(pair[0])
                    got.append(pair)
            if len(got) == N_EXTRA:
                out.extend((family, p) for p in got)
                return
        raise RuntimeError(f"{family}: could not draw {N_EXTRA} more distinct prompts")

    for family, (make, _) in makers.items():  # the same generators, continued
        fresh(family, lambda make=make: [make()])
    # Facts: the training facts not used yet, then capitals of training countries asked another way.
    rephrased = [
        (p.replace("What is the capital of ", "Which city is the capital of "), c, r, a)
        for p, c, r, a in bank_train
        if p.startswith("What is the capital of ")
    ]
    fresh("fact", lambda: bank_train[N_TRAIN:] + rephrased)
    rng = random.Random(SEED + 111)
    fresh("letter_case", lambda: letter_case(rng.sample(qa_train, 8), rng))
    fresh("one_word", lambda: one_word(rng.sample(qa_train, 8), rng))
    fresh("list_count", lambda: [list_count(cat_train, rng)()])
    return out


def _validate(splits: dict[str, list[tuple[str, Pair]]]) -> None:
    for rows in splits.values():
        prompts = [p for _, (p, *_) in rows]
        assert len(prompts) == len(set(prompts)), "duplicate prompt within a split"
        for _, (p, c, r, a) in rows:
            assert p and c and r and a and c != r, (p, c, r, a)
    train_prompts = {p for _, (p, *_) in splits["train"]}
    shared = [p for _, (p, *_) in splits["test"] if p in train_prompts]
    assert not shared, f"held-out prompts also in train: {shared}"
    # Bank-based families: the underlying questions / categories are disjoint too.
    def questions(split: str) -> set[str]:
        prompts = [p for f, (p, *_) in splits[split] if f in ("letter_case", "one_word")]
        return {
            q for q, _, _ in SIMPLE_QA if any(p.startswith(q + " ") or p.endswith(" " + q) for p in prompts)
        }

    assert not questions("train") & questions("test"), questions("train") & questions("test")
    for cat in CATEGORIES:
        tr = any(f == "list_count" and f" {cat}" in p for f, (p, *_) in splits["train"])
        te = any(f == "list_count" and f" {cat}" in p for f, (p, *_) in splits["test"])
        assert not (tr and te), cat


def to_jsonl(rows: list[tuple[str, Pair]]) -> str:
    lines = []
    for family, (prompt, chosen, rejected, answer) in rows:
        record = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "family": family,
            "answer": answer,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def token_stats(splits: dict[str, list[tuple[str, Pair]]]) -> None:
    """Print token-length statistics with the SmolLM2 tokenizer and chat template (as jaxrlhf
    renders conversational rows: prompt with the generation prompt; completion = rendered
    conversation minus the prompt, whitespace after the final EOS dropped)."""
    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    tok = load_tokenizer(demo_model_path())

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for split, rows in splits.items():
        lens: dict[str, list[int]] = {"prompt": [], "prompt_raw": [], "chosen": [], "rejected": []}
        for _, (p, c, r, _) in rows:
            msgs = [{"role": "user", "content": p}]
            pre = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            lens["prompt"].append(count(pre))
            lens["prompt_raw"].append(count(p))
            for key, text in (("chosen", c), ("rejected", r)):
                conv = msgs + [{"role": "assistant", "content": text}]
                full = tok.apply_chat_template(conv, tokenize=False)
                assert full.startswith(pre)
                lens[key].append(count(full[len(pre) :].rstrip()))
        print(f"{split} ({len(rows)} pairs)")
        for key, v in lens.items():
            print(f"  {key:11s} mean {sum(v) / len(v):5.1f}  min {min(v):3d}  max {max(v):3d}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="verify the files on disk instead of writing")
    ap.add_argument(
        "--stats", action="store_true", help="print token statistics (loads the SmolLM2 tokenizer)"
    )
    args = ap.parse_args(argv)

    splits = build()
    os.makedirs(args.out_dir, exist_ok=True)
    for split, rows in splits.items():
        path = os.path.join(args.out_dir, f"{split}.jsonl")
        text = to_jsonl(rows)
        if args.check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    print(f"{path}: differs from the generator's output", file=sys.stderr)
                    return 1
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        families: dict[str, int] = {}
        for fam, _ in rows:
            families[fam] = families.get(fam, 0) + 1
        print(f"{path}: {len(rows)} pairs  " + ", ".join(f"{k}={v}" for k, v in sorted(families.items())))
    if args.stats:
        token_stats(splits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
