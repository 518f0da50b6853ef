"""
TextVQA's score as the field computes it: lmms-eval 0.7.x's `textvqa_process_results` with the
EvalAI answer processor (itself the VQA challenge's), step by step and quirk by quirk, so that a
number here is the number a paper reports. Imports nothing of the project.

The answer processor, in its order:
  1. lower case; delete every ',' and '?'; split "'s" into " 's"; strip;
  2. '\\n' and '\\t' to spaces; strip;
  3. each mark of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! in turn: deleted when it touches a
     space in the text as it was after step 2 (or the text has a digit,digit comma, which step 1
     made impossible), else replaced by a space; then periods not followed by a digit are deleted,
     at most 32 of them (the reference passes re.UNICODE, 32, where re.sub takes its count);
  4. split on whitespace; number words zero..ten and 'none' to digits; articles a, an, the dropped;
     contractions restored from the VQA table (whose keys with a capital I never match lower-case
     text).
The score: min(#other references equal to the answer / 3, 1), averaged over the leave-one-out
subsets.
"""

import re
import statistics

# in the reference's order: each decision reads the text before any
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
PERIOD = re.compile(r"\.(?!\d)")
PERIOD_LIMIT = 32
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# the VQA evaluation's contraction table, as written there (its oddities included: "somebody'd" ->
# "somebodyd")
CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split()
)


def normalize_answer(s):
    """An answer (the model's or a reference) as the EvalAI processor leaves it (module
    docstring)."""
    t = str(s).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    before, glued = t, DIGIT_COMMA.search(t) is not None
    for p in PUNCTUATION:
        t = t.replace(p, "" if (p + " " in before or " " + p in before or glued) else " ")
    t = PERIOD.sub("", t, count=PERIOD_LIMIT)
    words = [NUMBERS.get(w, w) for w in t.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(answer, references):
    """The TextVQA score of one answer (lmms-eval logs it as 'exact_match'): min(#other references
    equal to the answer / 3, 1), averaged over the len(references) leave-one-out subsets; both sides
    normalised. NaN without references (the reference scorer fails there; such a sample is left out
    and counted)."""
    a = normalize_answer(answer)
    refs = [normalize_answer(r) for r in references]
    if not refs:
        return float("nan")
    return statistics.mean(
        min(1, float(sum(r == a for j, r in enumerate(refs) if j != i)) / 3)
        for i in range(len(refs))
    )


def top_answer_match(answer, references):
    """1.0 when the normalised answer equals the most common normalised reference (ties: the first
    seen). Not the metric lmms-eval calls exact_match (that one is vqa_accuracy)."""
    refs = [normalize_answer(r) for r in references]
    return float(bool(refs) and normalize_answer(answer) == max(refs, key=refs.count))
