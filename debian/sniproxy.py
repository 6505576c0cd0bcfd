#!/usr/bin/python3 -I
# /usr/bin/sniproxy of the Debian package: the program and its vendored dependencies are in
# /usr/lib/sniproxy, first on the path so they win over any Debian python3-* of the same name;
# BCC (python3-bpfcc) comes from Debian's dist-packages. -I: no PYTHONPATH or user site for a root daemon.
import sys

sys.path.insert(0, "/usr/lib/sniproxy")

from sniproxy.cli import main  # noqa: E402

sys.exit(main())
