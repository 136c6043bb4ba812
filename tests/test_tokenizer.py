import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from balora_diffusion import paths, world

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = paths.TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def test_ids_match_stable_diffusion_1_5(tokenizer):
    # Reference ids of SD 1.5's (= openai/clip-vit-large-patch14's) tokenizer.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("sks").input_ids == [49406, 48136, 49407]
    assert tokenizer("a photo of a dog").input_ids[5] == 1929
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407}


def test_auto_tokenizer_finds_the_class():
    auto = AutoTokenizer.from_pretrained(TOKENIZER)
    assert auto("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_new_placeholder_token_gets_one_new_id():
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    before = tokenizer("a <sks> dog").input_ids
    assert len(before) > 5  # split into pieces while unknown
    assert tokenizer.add_tokens("<sks>") == 1
    assert tokenizer.convert_tokens_to_ids("<sks>") == 49408
    assert tokenizer("a <sks> dog").input_ids == [49406, 320, 49408, 1929, 49407]


def test_text_round_trips(tokenizer):
    # Byte-level BPE loses nothing but case and whitespace (every word piece decodes with a space).
    texts = [s.caption() for s in world.all_scenes()[::97]] + ["Hello,   World! café 123 ⭐ <zorb>"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert "".join(tokenizer.decode(ids).split()) == "".join(text.lower().split())
    caption = world.all_scenes()[0].caption()  # plain words decode exactly
    assert tokenizer.decode(tokenizer(caption, add_special_tokens=False).input_ids).strip() == caption


def test_files_follow_clips_vocabulary_layout():
    # ids: 256 byte symbols, the same with "</w>", one token per merge (in merge order), 2 specials.
    vocab = json.loads((TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    # CLIP's byte symbols: the 188 printable Latin-1 bytes as themselves, then the other 68 bytes
    # (controls, space, soft hyphen...) shifted to U+0100 onwards, in byte order.
    printable = [chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]]
    symbols = printable + [chr(0x100 + n) for n in range(256 - len(printable))]
    by_id = sorted(vocab, key=vocab.get)
    assert list(vocab.values()) == list(range(49408))
    assert by_id[:256] == symbols and by_id[256:512] == [s + "</w>" for s in symbols]
    assert by_id[512:-2] == [line.replace(" ", "") for line in lines[1:]]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert (TOKENIZER / "LICENSE").read_text().count("MIT") >= 2


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "training" / "make_clip_tokenizer.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_conversion_script_from_a_wheel(tmp_path):
    # A wheel-like zip holding the BPE file (header line + merges, as OpenAI ships it).
    merges = (TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    bpe = gzip.compress(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/bpe_simple_vocab_16e6.txt.gz", bpe)
    result = _run_script(str(wheel), "--out", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    built = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert built("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert built("sks").input_ids == [49406, 48136, 49407]

    (tmp_path / "short.gz").write_bytes(gzip.compress("#version: 0.2\ni n\n".encode()))
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("pkg/other.txt", "x")
    for bad in ("short.gz", "empty.whl", "missing.gz"):
        result = _run_script(str(tmp_path / bad), "--out", str(tmp_path / "bad"))
        assert result.returncode == 2 and "error" in result.stderr and not (tmp_path / "bad").exists()
