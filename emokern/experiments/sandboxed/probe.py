"""The isolation probe of :func:`emokern.experiments.sandbox.check_isolation`, run in the sandbox as ``probe.py``.

Tries to reach a server the host listens on at 127.0.0.1 (argv[1]: its port) and to write each target (argv[2:]:
NAME=PATH, outside its directory); prints ``{"network" | NAME: "allowed" | "refused: <exception>"}`` as JSON.
"""

import json
import socket
import sys

found = {}


def attempt(name, action):
    try:
        action()
    except Exception as exc:
        found[name] = "refused: " + type(exc).__name__ + ": " + str(exc)
    else:
        found[name] = "allowed"


def connect():
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2):
        pass


def writer(path):
    def write():
        with open(path, "w") as f:
            f.write("escaped")
    return write


attempt("network", connect)
for target in sys.argv[2:]:
    name, _, path = target.partition("=")
    attempt(name, writer(path))
print(json.dumps(found))
