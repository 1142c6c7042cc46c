"""The command line, one module per command; `big_contrast.cli` only dispatches to them.

Each command defines exactly its own absl flags (`--help` lists them), spelt with underscores
(`--data_dir`, `--config.key=value`), reads its config through `base.loaded_config` +
`base.validated` (the checks `train` makes, for every command), and fails through
`base.execute`'s one error path. This is the only package that imports `big_contrast.train`:
the library (losses, models, data, evaluate, interop, checkpoint, workdir) does not depend on
the trainer or on the command line.
"""

# command name -> module under big_contrast.commands
COMMANDS = {
    "train": "train",
    "eval": "eval",
    "plan": "plan",
    "data convert": "data_convert",
    "data train-tokenizer": "data_tokenizer",
    "import": "import_",
    "export": "export",
}
