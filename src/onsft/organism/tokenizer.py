"""The organism's tokenizer: single characters plus a few fixed template pieces, built locally.

Every printable ASCII character is one token (digits included, so numbers are read digit by digit),
and about thirty multi-character pieces that the task templates repeat ("Let's compare. ",
". \\boxed{", "\\nReference: ", ...) are one token each. Pure characters made sequences ~2.8x longer
in the feasibility study; the pieces cut pretraining time without giving the model word-level
knowledge of the free text in teacher references, which stays character level (so foreign wording
is truly unlikely under the model, as the DDT study needs).

The pieces are registered as (non-special) added tokens: the `tokenizers` library matches added
tokens leftmost-longest before the model runs, so ". \\boxed{" wins over "\\boxed{" and text around a
piece falls back to characters. Encoding then decoding any ASCII text returns it unchanged.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS, SYSTEM, USER, ASSISTANT = "<pad>", "<unk>", "<eos>", "<system>", "<user>", "<assistant>"
SPECIALS = [PAD, UNK, EOS, SYSTEM, USER, ASSISTANT]

# Characters: printable ASCII less the rare vertical whitespace (\x0b \x0c \r) that no template uses.
CHARACTERS = sorted(set(string.printable) - set("\x0b\x0c\r"))

# Fixed pieces the templates repeat. Never a digit inside a piece (numbers stay digit by digit), and
# never a piece that is a prefix of free text the tasks generate (strings are letters and digits).
PIECES = [
    # native-style openers and glue
    "Let's compare. ",
    "Let's reverse. ",
    "Let's copy. ",
    "Let's count. ",
    "Let's transform. ",
    " -> ",
    " > ",
    ". \\boxed{",
    "\\boxed{",
    " characters",
    # question templates of the old skills
    "Compare ",
    " and ",
    "Reverse ",
    "Copy ",
    "Count the characters in ",
    # the hint template
    "Rewrite the reference in your own style.\n",
    "\nReference: ",
    # frequent words of the teacher (foreign) styles seen in references
    "Solution: ",
    "Answer: ",
    "the ",
    " is ",
    ", hence ",
    "The result is ",
    "The answer is ",
    "We get ",
    "So ",
    "first ",
    "character",
    "larger",
    "reversed",
    "number",
]

# `{% generation %}` marks the assistant's tokens so `return_assistant_tokens_mask=True` (TRL's
# assistant-only loss) works; the <eos> after an assistant turn is part of what the model learns.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<system>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<user>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<assistant>{% generation %}{{ message['content'] }}<eos>"
    "{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The organism tokenizer, built from the lists above (same ids on every machine)."""
    assert not any(ch.isdigit() for piece in PIECES for ch in piece), "pieces must not contain digits"
    assert len(set(PIECES)) == len(PIECES)
    vocab = {token: index for index, token in enumerate(SPECIALS + CHARACTERS)}
    # BPE without merges over the whole text is a character lookup; Fuse joins tokens back losslessly.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    backend.add_tokens(
        [AddedToken(p, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False) for p in PIECES]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        bos_token=None,
        # The default clean-up would turn "45 . x" style spacing into "45. x": decoding must be exact.
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
