"""CheckpointInfo, what inspecting a checkpoint found (passed whole to every rank), and the checks
every layout makes on its folder: the tokenizer file, the tokenizer against the vocabulary, the
model-parallel split the head counts allow."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llama.checkpoints.errors import CheckpointError
from llama.model.args import ModelArgs
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.load import load_tokenizer, read_tokenizer_files


@dataclass(frozen=True)
class CheckpointInfo:
    ckpt_dir: Path
    tokenizer_path: Path
    shard_paths: tuple[Path, ...]  # consolidated.00.pth, 01, ... in order; or a Hugging Face folder's weight files
    args: ModelArgs  # vocab_size resolved from the tokenizer
    # The tokenizer's files (hundreds of KB to a few MB: llama.tokenizers.load.read_tokenizer_files), so
    # ranks and replicas on machines without the checkpoint still have it.
    tokenizer_files: dict[str, bytes] = field(repr=False, default_factory=dict)
    itemsize: int = 4  # bytes per value in the weight files (2 for Meta's bfloat16 releases)
    layout: str = "meta"  # "meta" | "hf"
    tied: bool = False  # Hugging Face's tie_word_embeddings: the output layer is the embedding
    # Hugging Face: each tensor's weight file (name within ckpt_dir), so a machine reading the
    # slices needs only the weight files, not the index.
    weight_map: dict[str, str] = field(repr=False, default_factory=dict)
    # Meta's layout: each tensor the files cut and the dim they cut it along, read from their
    # shapes (tok_embeddings: 1 in Llama 2's files, 0 in Llama 3's). Empty for one file.
    file_dims: dict[str, int] = field(repr=False, default_factory=dict)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path, self.tokenizer_files or None)


def find_tokenizer(ckpt_dir: Path, given: str | Path | None, names: tuple[str, ...]) -> Path:
    """The tokenizer file: the one given, else the first of `names` in ckpt_dir."""
    if given:
        path = Path(given)
    else:
        path = next((ckpt_dir / n for n in names if (ckpt_dir / n).is_file()), ckpt_dir / names[0])
    if not path.is_file():
        raise CheckpointError(
            f"tokenizer {path} is missing: pass tokenizer_path pointing at the {' or '.join(names)} that came with "
            f"the checkpoint."
        )
    return path


def fit_tokenizer(args: ModelArgs, tok_path: Path, config_path: Path, padded_vocab: bool) -> dict[str, bytes]:
    """Read the tokenizer's files and check its ids fit the model's vocabulary (resolving -1);
    Hugging Face models may pad the embedding beyond the tokenizer (padded_vocab)."""
    try:
        tokenizer_files = read_tokenizer_files(tok_path)
        n_words = load_tokenizer(tok_path, tokenizer_files).n_words
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if args.vocab_size == -1:
        args.vocab_size = n_words
    elif args.vocab_size != n_words and not (padded_vocab and args.vocab_size > n_words):
        raise CheckpointError(
            f"{config_path} says vocab_size {args.vocab_size} but tokenizer {tok_path} has {n_words} "
            f"pieces: use the tokenizer that came with this checkpoint."
        )
    return tokenizer_files


def check_split(args: ModelArgs, ckpt_dir: Path, model_parallel_size: int) -> None:
    try:
        args.validate_for(model_parallel_size)
    except ValueError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None
