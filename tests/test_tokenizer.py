"""tokenizer.py's tiktoken path against HF `tokenizers` on a Qwen2-layout byte-level BPE."""
import json

import pytest

from blocks import MEMENTO_TOKENS
from tokenizer import QWEN_PATTERN, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"] + list(MEMENTO_TOKENS)


def _corpus(shared_data):
    lines = [json.loads(l) for l in (shared_data / "memento_traces.jsonl").read_text().splitlines() if l.strip()]
    texts = [d["problem"] + "\n" + d["response"] for d in lines]
    texts += ["The quick brown fox jumps over the lazy dog. 1234567 + 89 = ?", "naïve café — 東京 😀 don't we'll"]
    return lines, texts


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    from conftest import require_shared_data
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    _, texts = _corpus(require_shared_data())
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(texts * 3, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_same_ids_as_tokenizers(hf_tokenizer_file, shared_data):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(hf_tokenizer_file))
    ours = Tokenizer.from_file(hf_tokenizer_file)
    traces, texts = _corpus(shared_data)
    samples = texts + [
        "Hello world!  Multiple   spaces\n\n\tand tabs\r\n",
        "unseen words: zyxwvut quokka 3.14159 ''' ```python\nprint(1)\n```",
        "<|im_start|>user\nWhat is <think>2+2</think>?<|im_end|>\n<|im_start|>assistant\n",
        "text<|block_start|>inside<|block_end|><|summary_start|>m<|summary_end|>tail",
        "e\u0301 composed by NFC",
    ]
    for t in samples:
        assert ours.encode(t) == hf.encode(t).ids, t[:60]
        assert ours.decode(ours.encode(t)) == hf.decode(hf.encode(t).ids, skip_special_tokens=False)
    for t in samples[:-1]:  # NFC changes the last one by design
        assert ours.decode(ours.encode(t)) == t
    assert len(traces) == 2
    assert ours.token_id("<|summary_end|>") == hf.token_to_id("<|summary_end|>")


def test_byte_level_round_trip_and_specials(tmp_path):
    tok = Tokenizer.byte_level()
    text = "Σ digits: 3+4=7 <|block_start|>x<|block_end|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.token_id("<|block_start|>")) == 1 and max(ids) < tok.n_vocab == 265
    assert tok.encode("Σ") == list("Σ".encode())
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(text) == ids and again.special_ids == tok.special_ids
    assert tok.chat_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(KeyError, match="no special token '<nope>'"):
        tok.token_id("<nope>")


def test_saved_byte_level_loads_in_tokenizers(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer.byte_level()
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "a<|summary_start|>bé\n"
    assert hf.encode(text).ids == tok.encode(text)


def test_not_byte_level_bpe_is_rejected(tmp_path, hf_tokenizer_file):
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": None}
    p = tmp_path / "wp.json"
    p.write_text(json.dumps(wordpiece))
    with pytest.raises(ValueError, match="not a BPE tokenizer"):
        Tokenizer.from_file(p)
    data = json.loads(hf_tokenizer_file.read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no ByteLevel step"):
        Tokenizer.from_file(p)
    data = json.loads(hf_tokenizer_file.read_text())
    data["model"]["vocab"]["▁hello"] = 99999  # SentencePiece-style, not byte-level
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not in byte-to-unicode form"):
        Tokenizer.from_file(p)
