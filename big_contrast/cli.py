"""`big-contrast train | eval | plan | data convert | data train-tokenizer | import | export`

    big-contrast train --config configs/siglip_b16.py:arg --config.batch_size=32768 --workdir DIR
    big-contrast eval  --workdir DIR [--config configs/demo.py] [--step N] [--json PATH]
    big-contrast eval  --workdir DIR --benchmarks imagenet2012,cifar100,coco --data_dir D
    big-contrast plan  --config configs/siglip_so400m14.py [--device_memory_gb 95]
    big-contrast data convert shards/*.tar out/ | big-contrast data train-tokenizer out/ --vocab_size N --output M
    big-contrast import SOURCE --workdir W [--arch NAME]   (HF dir, open_clip file, big_vision .npz)
    big-contrast export --workdir W --to hf|npz OUT

`big-contrast COMMAND --help` lists that command's flags (absl flags, spelt with underscores).
Configs are python files with `get_config(arg=None)` (ml_collections); `--config path:arg`
passes `arg`, and `--config.key=value` overrides any field, big_vision style.

Expected failures (a config, data, checkpoint or start-up problem) exit with status 2 and a
sentence on stderr saying what to change; `--debug` (or BIG_CONTRAST_DEBUG=1) adds the traceback.
The commands themselves are `big_contrast/commands/`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from big_contrast.commands import COMMANDS

USAGE = __doc__
DEBUG_ENV = "BIG_CONTRAST_DEBUG"


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    debug = "--debug" in argv[1:] or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    args = [a for a in argv[1:] if a != "--debug"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = _command(args)
    if name == "data":
        asked = bool(rest) and rest[0] in ("-h", "--help")
        print("big-contrast data: give a sub-command, convert or train-tokenizer "
              "(e.g. big-contrast data convert --help).", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if name not in COMMANDS:
        print(f"big-contrast: unknown command {name!r}; use one of {', '.join(COMMANDS)}.\n{USAGE}", file=sys.stderr)
        return 2
    if hasattr(signal, "SIGXFSZ"):  # a file-size quota then fails the write (EFBIG), not the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if not debug:
        from big_contrast.logs import quiet_library_tracebacks

        quiet_library_tracebacks()
    from big_contrast.commands import base

    module = importlib.import_module(f"big_contrast.commands.{COMMANDS[name]}")
    return base.execute(name, module, rest, debug=debug)


def _command(args: list[str]) -> tuple[str, list[str]]:
    """('data convert', rest) for the two-word commands, ('train', rest) for the others."""
    if args[0] == "data" and len(args) > 1 and not args[1].startswith("-"):
        return f"data {args[1]}", args[2:]
    return args[0], args[1:]


if __name__ == "__main__":
    sys.exit(main())
