"""The first code of a sandboxed child, run as ``python -I -S -B -c <this file> ...`` (see
:mod:`emokern.experiments.sandbox`): the started line, the report key, the rlimits, the guard (unless its source,
the last argument, is empty), then the untrusted module as ``__main__``. Arguments: workdir, report fd, key fd,
the rlimits as JSON, the module, its arguments, the guard's source.

Every report line after the started one is signed with the per-run key (keyed BLAKE2b, numbered), which the host
writes into a pipe that is read and closed here before any untrusted line runs: the code can write to the report
descriptor, but what it writes without the key is dropped by the host as forged. A run that ends normally (its
module returned or raised) closes the report with a signed ``END <refusals>`` line.

Not imported by the host: the host fills in the started line and the number of refusals reported in full (the two
placeholders below) and passes the text to ``-c``.
"""

import sys
def _start():
    import posix
    workdir, report_fd, key_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    posix.write(report_fd, b"@STARTED@\n")
    key = b""
    while len(key) < 32:
        chunk = posix.read(key_fd, 32 - len(key))
        if not chunk:
            break
        key += chunk
    posix.close(key_fd)
    import _blake2, builtins, gc, json, os, resource, runpy
    limits, module = json.loads(sys.argv[4]), sys.argv[5]
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    blake2b, write, counts = _blake2.blake2b, posix.write, [0, 0]  # counts: lines signed, refusals
    def signed(text):
        data = (str(counts[0]) + " " + text).encode("utf-8", "replace")
        counts[0] += 1
        mac = blake2b(data, key=key, digest_size=16).hexdigest().encode()
        write(report_fd, mac + b" " + data + b"\n")
    def report(text):
        counts[1] += 1
        if counts[1] <= int("@LIMIT@"):  # the first refusals in full; the closing line counts them all
            signed("V " + text)
    def finish():
        try:
            signed("END " + str(counts[1]))
        except OSError:
            pass
    if sys.argv[-1]:
        read_roots = tuple(sorted({workdir} | {p for p in sys.path if p and p.startswith("/")}))
        read_files = frozenset({"/dev/null", "/dev/urandom", "/dev/random"})
        flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        private = {"__builtins__": dict(vars(builtins))}
        exec(sys.argv[-1], private)
        sys.addaudithook(private["make_hook"](workdir, read_roots, read_files, report, posix.getcwd, flags,
                                              gc.disable, gc.enable, gc.isenabled))
        del private
    sys.argv = [module] + sys.argv[6:-1]
    sys.path.insert(0, workdir)
    return runpy, module, finish
def _main():
    runpy, module, finish = _start()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        finish()
_main()
