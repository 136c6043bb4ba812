"""Build the shipped CLIP tokenizer files (assets/tokenizer/) from OpenAI's CLIP BPE file.

The BPE file `bpe_simple_vocab_16e6.txt.gz` ships inside the PyPI wheels of open-clip-torch and
clip-anytorch; fetch one without its dependencies and point this script at it:

    pip download --no-deps open-clip-torch -d /tmp/oc
    python training/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl

It writes the Hugging Face CLIPTokenizer layout SD 1.x uses: vocab.json (49,408 tokens),
merges.txt, tokenizer_config.json, special_tokens_map.json, and the BPE file's licence. The ids
equal those of SD 1.5's tokenizer ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407).
"""
from __future__ import annotations

import argparse
import gzip
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from balora_diffusion import paths  # noqa: E402
from balora_diffusion.atomic import atomic_path, write_json_atomic  # noqa: E402
from balora_diffusion.errors import UserError  # noqa: E402

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 byte symbols, the same with the end-of-word mark, the merges, 2 specials.
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SD 1.5's tokenizer: unknown characters and padding both map to <|endoftext|>.
SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                    "errors": "replace", "add_prefix_space": False, **SPECIAL_TOKENS}

LICENSE = """The vocabulary and merges in this folder are converted from bpe_simple_vocab_16e6.txt.gz,
the byte-pair-encoding file of OpenAI's CLIP (https://github.com/openai/CLIP), as redistributed
in the open_clip package (https://github.com/mlfoundations/open_clip). Both are MIT licensed:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

open_clip: Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini,
Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi,
Ali Farhadi, Ludwig Schmidt; released under the same MIT terms.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (whitespace and controls moved up).

    Its insertion order (printable bytes first, then the moved ones) is the order of CLIP's first ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in table]
    table.update((b, chr(256 + n)) for n, b in enumerate(moved))
    return table


def read_bpe(source: Path) -> list[str]:
    """Merge lines of the BPE file, from a wheel/zip holding it or from the .gz itself."""
    if not source.is_file():
        raise UserError(f"no such file: {source}")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = [n for n in archive.namelist() if n.endswith("/" + BPE_NAME) or n == BPE_NAME]
            if not names:
                raise UserError(f"{source} holds no {BPE_NAME}")
            data = archive.read(names[0])
    else:
        data = source.read_bytes()
    try:
        lines = gzip.decompress(data).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: not a gzip'ed CLIP BPE file ({exc})") from exc
    merges = lines[1:1 + N_MERGES]  # line 0 is the "#version" header
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise UserError(f"{source}: expected {N_MERGES} merge lines of two symbols each")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise UserError(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def write_tokenizer(merges: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "vocab.json", build_vocab(merges))
    with atomic_path(out / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_json_atomic(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    write_json_atomic(out / "special_tokens_map.json", SPECIAL_TOKENS)
    with atomic_path(out / "LICENSE") as tmp:
        tmp.write_text(LICENSE, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path,
                        help=f"an open-clip-torch or clip-anytorch wheel (.whl) holding {BPE_NAME}, or that .gz file")
    parser.add_argument("--out", type=Path, default=paths.TOKENIZER,
                        help="folder to write the tokenizer files into (default: assets/tokenizer)")
    args = parser.parse_args(argv)
    try:
        write_tokenizer(read_bpe(args.source), args.out)
    except UserError as exc:
        print(f"make_clip_tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {VOCAB_SIZE} tokens and {N_MERGES} merges to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
