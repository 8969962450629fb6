"""Defaults of the store's maintenance commands, importable by the CLI without loading pyarrow."""

#: ``labelmill optimize``: shards per group file (a night that relabels one of them rewrites the others)
GROUP_SHARDS = 16
#: ``labelmill optimize``: no group file grows past this; files already this large are left as they are
TARGET_MB = 128
