"""The wire between the two processes of a coding-task test run: values, proxies and calls over a pair of pipes.

This file runs inside the sandboxes (it is copied into both working directories), so it uses the standard library
only. :mod:`emokern.experiments.coding_tests` explains the arrangement: the tests run in one process, the model's
``solution.py`` in another, and the tests call the solution's functions through a :class:`Peer` on each side.

**Messages** are length-prefixed JSON (a 4-byte big-endian length, then UTF-8), at most :data:`MAX_MESSAGE` bytes:
``["q", call, kind, payload]`` asks, ``["r", call, value, seconds]`` answers (``seconds``: how long the answering
side spent on it, its own clock), ``["x", call, type name, message, traceback text]`` raises. While a side waits for
its answer it serves the other side's questions (a solution comparing two of the tests' items calls back into the
test process), so calls nest to any depth, one at a time.

**Values** cross by value when they are plain data of exactly these types: ``None``, ``bool``, ``int``, ``float``,
``complex``, ``str``, ``bytes``, ``bytearray``, ``range``, and ``tuple``, ``list``, ``dict``, ``set``,
``frozenset`` of such values (a subclass, such as a list that counts its reads, is not plain data). Anything else
crosses as a reference: the receiver gets a :class:`Proxy` whose operators, attributes and calls are carried out by
the side that owns the object, and a reference that comes home is the original object again.

**What a side lets the other do with its objects** (:meth:`Peer.permit`): the solution's side serves everything
(the tests are trusted); the tests' side serves, on its objects, the data model's operators (comparison,
arithmetic, ``len``, indexing, ``in``, iteration, ``hash``, ``bool``, ``repr``), attributes whose names do not
start with ``_`` on instances of ordinary classes (never on modules, classes, functions, frames, code objects,
generators or tracebacks, and never an attribute whose value is one of those), calls of the methods so reached and
of callables the tests passed themselves. So the solution can use what a test hands it as the test would expect,
but cannot walk from it to the test module, its files, the builtins or the runner.
"""

import base64
import builtins
import json
import operator
import os
import struct
import sys
import traceback
import types

__all__ = ["MAX_MESSAGE", "BadValue", "ChannelBroken", "Peer", "Proxy", "RemoteError"]

MAX_MESSAGE = 64 << 20  # bytes in one message; a larger one breaks the channel
MAX_DEPTH = 100  # nesting of a value sent by value


class ChannelBroken(Exception):
    """The channel cannot be used any more: the other side ended, sent something that is not a message, or a call
    was cut off in the middle (a time limit) so that the two sides are out of step."""


class BadValue(ValueError):
    """A value arrived that this side does not read (malformed, too deep, or a reference to nothing it owns)."""


class RemoteError(Exception):
    """An exception raised on the other side whose type this side does not rebuild: ``"Type: message"``."""


# Exception types rebuilt by name; anything else arrives as RemoteError. SystemExit, KeyboardInterrupt and
# GeneratorExit are left out: the other side's exit is not this side's.
_REBUILT = {name: value for name, value in vars(builtins).items()
            if isinstance(value, type) and issubclass(value, BaseException)
            and value not in (SystemExit, KeyboardInterrupt, GeneratorExit, BaseException)
            and not issubclass(value, BaseExceptionGroup if sys.version_info >= (3, 11) else ())}

_BINARY = {"lt": operator.lt, "le": operator.le, "eq": operator.eq, "ne": operator.ne, "gt": operator.gt,
           "ge": operator.ge, "add": operator.add, "sub": operator.sub, "mul": operator.mul,
           "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
           "and": operator.and_, "or": operator.or_, "xor": operator.xor, "lshift": operator.lshift,
           "rshift": operator.rshift, "matmul": operator.matmul, "divmod": divmod,
           "getitem": operator.getitem, "contains": operator.contains}
_UNARY = {"len": len, "iter": iter, "next": next, "hash": hash, "bool": bool, "repr": repr, "str": str,
          "int": int, "float": float, "index": operator.index, "neg": operator.neg, "pos": operator.pos,
          "abs": abs, "invert": operator.invert, "reversed": reversed}
_OPAQUE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.FrameType, types.CodeType, types.TracebackType, types.GeneratorType, types.CoroutineType,
           types.AsyncGeneratorType, types.CellType, types.MappingProxyType, types.GetSetDescriptorType,
           types.MemberDescriptorType, types.WrapperDescriptorType, types.MethodWrapperType, staticmethod,
           classmethod, property, BaseException)


class Proxy:
    """An object of the other side. Its operators, attributes and calls are carried out there; ``isinstance``
    sees only this class."""

    __slots__ = ("_peer", "_ref", "__weakref__")

    def __init__(self, peer, ref):
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_ref", ref)

    def __getattr__(self, name):
        return self._peer.request("op", [self, "getattr", [name]])

    def __setattr__(self, name, value):
        self._peer.request("op", [self, "setattr", [name, value]])

    def __call__(self, *args, **kwargs):
        return self._peer.request("op", [self, "call", [list(args), kwargs]])

    def __next__(self):
        return self._peer.request("op", [self, "next", []])

    def __setitem__(self, key, value):
        self._peer.request("op", [self, "setitem", [key, value]])

    def __delitem__(self, key):
        self._peer.request("op", [self, "delitem", [key]])


def _unary(name):
    def method(self):
        return self._peer.request("op", [self, name, []])
    method.__name__ = f"__{name}__"
    return method


def _binary(name, reflected=False):
    def method(self, other):
        if reflected:  # other <op> self, carried out where self lives
            return self._peer.request("op", [self, "r" + name, [other]])
        return self._peer.request("op", [self, name, [other]])
    method.__name__ = f"__{'r' if reflected else ''}{name}__"
    return method


for _name in ("len", "iter", "hash", "bool", "repr", "str", "int", "float", "index", "neg", "pos", "abs", "invert",
              "reversed"):
    setattr(Proxy, f"__{_name}__", _unary(_name))
for _name in _BINARY:
    if _name != "divmod":
        setattr(Proxy, f"__{_name}__", _binary(_name))
Proxy.__divmod__ = _binary("divmod")
for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
              "matmul", "divmod"):
    setattr(Proxy, f"__r{_name}__", _binary(_name, reflected=True))
del _name


class Peer:
    """One end of the channel. ``side``: ``"tests"`` (serves only what :meth:`permit` allows) or ``"solution"``
    (serves everything). ``exceptions``: further exception types to rebuild by name. ``handlers``: further kinds of
    question this side answers, ``{kind: function(payload) -> value}``."""

    def __init__(self, read_fd, write_fd, side, exceptions=None, handlers=None):
        self.read_fd, self.write_fd, self.side = read_fd, write_fd, side
        self.exceptions = dict(_REBUILT, **(exceptions or {}))
        self.handlers = dict(handlers or {})
        self.objects = {}  # ref -> an object of this side that the other side holds a reference to
        self.refs = {}  # id(object) -> ref (the objects stay alive in self.objects, so ids are not reused)
        self.proxies = {}  # ref of the other side -> its Proxy here (one proxy per remote object)
        self.granted = set()  # refs of callables this side handed over itself (tests' side: may be called)
        self.reached = set()  # refs of methods reached through permitted attributes (may be called)
        self.calls = 0
        self.depth = 0
        self.broken = None
        self.transport_s = 0.0  # wall time of outermost calls less what the other side said it spent on them
        self.round_trip_s = 0.0  # a bare round trip (see calibrate)
        self.handlers.setdefault("ping", lambda payload: None)

    def calibrate(self, times=5):
        """Measure a bare round trip (the fastest of ``times`` pings) for the bound on transport time."""
        best = None
        for _ in range(times):
            started = _CLOCK[0]()
            self.request("ping", None)
            elapsed = _CLOCK[0]() - started
            best = elapsed if best is None else min(best, elapsed)
        self.transport_s = 0.0
        self.round_trip_s = best or 0.0

    # -- framing --------------------------------------------------------------------------------------------------

    def _write(self, message):
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"a value of {len(data)} bytes is too large to send (the limit is {MAX_MESSAGE})")
        view = memoryview(struct.pack(">I", len(data)) + data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def _read_exactly(self, n):
        chunks, left = [], n
        while left:
            chunk = os.read(self.read_fd, min(left, 1 << 20))
            if not chunk:
                raise ChannelBroken("the other process ended")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read(self):
        (length,) = struct.unpack(">I", self._read_exactly(4))
        if length > MAX_MESSAGE:
            raise ChannelBroken(f"the other process sent a message of {length} bytes (the limit is {MAX_MESSAGE})")
        try:
            message = json.loads(self._read_exactly(length).decode("utf-8"))
        except ValueError:
            raise ChannelBroken("the other process sent something that is not a message") from None
        if not (isinstance(message, list) and len(message) >= 2 and message[0] in ("q", "r", "x")
                and type(message[1]) is int):
            raise ChannelBroken("the other process sent something that is not a message")
        return message

    # -- values ---------------------------------------------------------------------------------------------------

    def encode(self, value, depth=0, grant=False):
        """``value`` as a JSON tree: plain data by value, anything else as a reference (``grant``: the other side
        may call it, where this side restricts calls)."""
        if depth > MAX_DEPTH:
            raise ValueError(f"a value nested deeper than {MAX_DEPTH} levels cannot be sent")
        kind = type(value)
        if value is None or kind is bool or kind is str:
            return value
        if kind is int:
            return value if -(1 << 53) < value < (1 << 53) else ["i", str(value)]
        if kind is float:
            return ["g", repr(value)]
        if kind is complex:
            return ["c", repr(value.real), repr(value.imag)]
        if kind is bytes or kind is bytearray:
            return ["b" if kind is bytes else "a", base64.b64encode(value).decode("ascii")]
        if kind is range:
            return ["n", value.start, value.stop, value.step]
        if kind in (tuple, list, set, frozenset):
            tag = {tuple: "t", list: "l", set: "s", frozenset: "f"}[kind]
            return [tag] + [self.encode(v, depth + 1, grant) for v in value]
        if kind is dict:
            return ["d"] + [[self.encode(k, depth + 1, grant), self.encode(v, depth + 1, grant)]
                            for k, v in value.items()]
        if kind is Proxy and value._peer is self:
            return ["h", value._ref]  # home: the other side's own object
        ref = self.refs.get(id(value))
        if ref is None:
            ref = len(self.objects)
            self.objects[ref] = value
            self.refs[id(value)] = ref
        if grant:
            self.granted.add(ref)
        return ["o", ref]

    def decode(self, tree, depth=0):
        if depth > MAX_DEPTH:
            raise BadValue(f"a value nested deeper than {MAX_DEPTH} levels arrived")
        if tree is None or type(tree) in (bool, str, int):
            return tree
        if type(tree) is not list or not tree or type(tree[0]) is not str:
            raise BadValue("a value that this side does not read arrived")
        tag, rest = tree[0], tree[1:]
        try:
            if tag == "i":
                return int(rest[0])
            if tag == "g":
                return float(rest[0])
            if tag == "c":
                return complex(float(rest[0]), float(rest[1]))
            if tag in ("b", "a"):
                data = base64.b64decode(rest[0].encode("ascii"), validate=True)
                return data if tag == "b" else bytearray(data)
            if tag == "n":
                return range(int(rest[0]), int(rest[1]), int(rest[2]))
            if tag in ("t", "l", "s", "f"):
                items = [self.decode(v, depth + 1) for v in rest]
                return {"t": tuple, "l": list, "s": set, "f": frozenset}[tag](items)
            if tag == "d":
                return {self.decode(k, depth + 1): self.decode(v, depth + 1) for k, v in rest}
            if tag == "h":
                return self.objects[rest[0]]  # one of ours, back home
            if tag == "o":
                proxy = self.proxies.get(rest[0])
                if proxy is None:
                    proxy = self.proxies[rest[0]] = Proxy(self, rest[0])
                return proxy
        except (BadValue, ChannelBroken):
            raise
        except Exception as exc:  # a malformed value, or a reference to nothing this side owns
            raise BadValue(f"a malformed value arrived ({type(exc).__name__})") from None
        raise BadValue(f"a value of unknown kind {tag!r} arrived")

    # -- calls ----------------------------------------------------------------------------------------------------

    def request(self, kind, payload):
        """Ask the other side (``kind``: ``"op"`` or a handler's name) and return its answer, serving its questions
        in the meantime. An exception it raised is raised here; anything that cuts the wait short (a time limit)
        breaks the channel."""
        if self.broken:
            raise ChannelBroken(self.broken)
        self.calls += 1
        call = self.calls
        outermost = self.depth == 0
        self.depth += 1
        clock = _CLOCK[0]
        started = clock()
        try:
            tree = self.encode(payload, grant=True)
            encoded = clock()
            self._write(["q", call, kind, tree])
            while True:
                message = self._read()
                if message[0] == "q":
                    self.serve(message)
                    continue
                if message[1] != call:
                    raise ChannelBroken("the other process answered a question that was not asked")
                break
        except BaseException as exc:
            self.broken = self.broken or f"the channel broke during a call ({type(exc).__name__}: {exc})"
            raise
        finally:
            self.depth -= 1
        if message[0] == "r":
            received = clock()
            value = self.decode(message[2])
            if outermost:
                # The other side's own account of its time is believed only as far as moving the data could take:
                # three bare round trips plus four times this side's encoding and decoding of it.
                spent = message[3] if len(message) > 3 and type(message[3]) in (int, float) else 0.0
                wall = clock() - started
                bound = 3 * self.round_trip_s + 4 * ((encoded - started) + (clock() - received))
                self.transport_s += min(wall - min(max(float(spent), 0.0), wall), bound)
            return value
        name, text = str(message[2]), str(message[3])[:4000]
        remote_trace = str(message[4])[:4000] if len(message) > 4 else ""
        kind_ = self.exceptions.get(name)
        exc = kind_(text) if kind_ is not None else RemoteError(f"{name}: {text}" if text else name)
        exc.remote_traceback = remote_trace
        raise exc

    def serve(self, message):
        """Answer one question of the other side."""
        _, call, kind, payload = (message + [None, None])[:4]
        clock = _CLOCK[0]
        try:
            args = self.decode(payload)
            started = clock()
            if kind == "op":
                value = self._operate(*args)
            elif kind in self.handlers:
                value = self.handlers[kind](args)
            else:
                raise PermissionError(f"this side answers no question of kind {kind!r}")
            spent = clock() - started
            reply = ["r", call, self.encode(value), spent]
        except ChannelBroken:
            raise
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt,)) or type(exc).__name__ == "TestTimeout" and self.side == "tests":
                raise
            reply = ["x", call, type(exc).__name__, _message(exc), _trace(exc)]
        self._write(reply)

    def serve_forever(self):
        """Answer questions until the other side closes the channel (the solution's side)."""
        while True:
            try:
                message = self._read()
            except ChannelBroken:
                return
            if message[0] != "q":
                return
            self.serve(message)

    # -- what the other side may do with this side's objects ------------------------------------------------------

    def _operate(self, target, op, args):
        if type(target) is Proxy:
            raise TypeError("an operation on an object of the asking side was sent to this side")
        if type(op) is not str or type(args) is not list:
            raise TypeError("a malformed operation arrived")
        ref = self.refs.get(id(target))
        self.permit(target, ref, op, args)
        if op == "getattr":
            value = getattr(target, args[0])
            if self.side == "tests":
                if isinstance(value, _OPAQUE) and not self._method_of(value, target):
                    raise AttributeError(f"{type(target).__name__}.{args[0]} is not reachable from the solution")
                if isinstance(value, (types.MethodType, types.BuiltinMethodType)):
                    self.reached.add(self._ref_of(value))
            return value
        if op == "setattr":
            setattr(target, args[0], args[1])
            return None
        if op == "call":
            positional, keywords = args
            return target(*positional, **keywords)
        if op == "setitem":
            operator.setitem(target, args[0], args[1])
            return None
        if op == "delitem":
            operator.delitem(target, args[0])
            return None
        if op in _UNARY:
            return _UNARY[op](target)
        if op in _BINARY:
            return _BINARY[op](target, args[0])
        if op.startswith("r") and op[1:] in _BINARY:
            return _BINARY[op[1:]](args[0], target)
        raise TypeError(f"unknown operation {op!r}")

    def _ref_of(self, value):
        self.encode(value)
        return self.refs[id(value)]

    @staticmethod
    def _method_of(value, target):
        return isinstance(value, (types.MethodType, types.BuiltinMethodType)) and value.__self__ is target

    def permit(self, target, ref, op, args):
        """Raise ``PermissionError`` unless this side lets the other do ``op`` on ``target`` (see the module
        docstring). The solution's side permits everything."""
        if self.side != "tests":
            return
        if op == "getattr" or op == "setattr":
            name = args[0]
            if type(name) is not str or name.startswith("_"):
                raise PermissionError(f"the solution may not reach attribute {name!r} of the tests' objects")
            if isinstance(target, _OPAQUE):
                raise PermissionError(f"the solution may not reach attributes of a {type(target).__name__} of the "
                                      f"tests")
            if op == "setattr":
                raise PermissionError("the solution may not change the tests' objects' attributes")
        elif op == "call":
            if ref not in self.granted and ref not in self.reached:
                raise PermissionError(f"the solution may not call this {type(target).__name__} of the tests")
        elif op in ("setitem", "delitem"):
            if isinstance(target, _OPAQUE):
                raise PermissionError(f"the solution may not change a {type(target).__name__} of the tests")


def _message(exc):
    try:
        return str(exc)[:4000]
    except Exception:
        return "(the exception's message could not be read)"


def _trace(exc):
    """The frames of ``exc`` in files of the working directory (no runner frames), as text."""
    try:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if os.path.dirname(os.path.abspath(f.filename)) == os.getcwd()
                  and os.path.basename(f.filename) not in ("remote_calls.py", "solution_server.py", "test_runner.py")]
        return "".join(f'  File "{os.path.basename(f.filename)}", line {f.lineno}, in {f.name}\n    {f.line}\n'
                       for f in frames[-4:])
    except Exception:
        return ""


# The clock both sides time calls with, taken before any other code of the process runs (the test runner replaces
# the time module's functions with a virtual clock; the solution could replace them on its side).
import time as _time  # noqa: E402
_CLOCK = [_time.perf_counter]
