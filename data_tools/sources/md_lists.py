"""Meta-Dataset's auxiliary lists (data_tools/md_aux/, shipped unchanged; source and licence in its README.md).

- ``VggFlower_labels.txt`` / ``TrafficSign_labels.txt``: a comment line, then one class name per line, in the
  order of the dataset's numeric labels (MD's class names are ``%03d.<name>`` / ``%02d.<name>``).
- ``ImageNet_{Caltech101,Caltech256,CUBirds}_duplicates.txt``: ``<synset>/<file>  # <file in the other
  dataset>`` lines, ``#`` lines are comments. MD skips an ILSVRC image whose *file name* (not path) is listed.
"""
from __future__ import annotations

from pathlib import Path

from data_tools.writer import ConversionError

AUX_DIR = Path(__file__).resolve().parents[1] / "md_aux"
DUPLICATE_LISTS = tuple(f"ImageNet_{other}_duplicates.txt" for other in ("Caltech101", "Caltech256", "CUBirds"))


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConversionError(f"cannot read Meta-Dataset's {what} {path}: {e}") from e


def label_names(file_name: str) -> list[str]:
    """The class names of a shipped ``*_labels.txt`` in label order (MD drops the first line, a comment)."""
    return _read(AUX_DIR / file_name, "label list").splitlines()[1:]


def duplicate_files(folder: Path | None = None) -> set[str]:
    """File names MD leaves out of ILSVRC, from the three duplicate lists in ``folder`` (default: the shipped
    copies; a user's MD checkout has them in meta_dataset/dataset_conversion/)."""
    where = "the shipped copies in" if folder is None else "--md-duplicates"
    folder = AUX_DIR if folder is None else Path(folder)
    missing = [n for n in DUPLICATE_LISTS if not (folder / n).is_file()]
    if missing:
        raise ConversionError(f"{where} {folder}: no {', '.join(missing)} there; pass --md-duplicates with the "
                              f"meta_dataset/dataset_conversion folder of a Meta-Dataset checkout")
    out = set()
    for n in DUPLICATE_LISTS:
        for line in _read(folder / n, "duplicate list").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.add(Path(line.split("#")[0].strip()).name)
    return out
