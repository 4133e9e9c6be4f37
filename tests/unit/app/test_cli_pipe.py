"""The command line's handling of a closed stdout (``slidestream ... | head``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import sys

    import click
    from slidestream.cli import _Group

    @click.group(cls=_Group)
    def cli():
        pass

    @cli.command()
    def flood():
        out = sys.stdout
        for i in range(2_000_000):
            out.write(f"{i},some,cells,of,a,long,export\\n")

    cli()
    """
)


def test_a_reader_that_leaves_ends_the_command_quietly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "flood"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"0,some,cells,of,a,long,export\n"
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141  # 128 + SIGPIPE, as a process ended by the signal
    assert err == "", err
