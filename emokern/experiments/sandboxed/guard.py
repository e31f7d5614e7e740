"""The Python guard: ``make_hook`` builds the audit hook that the bootstrap adds in a sandboxed child before any
untrusted line runs (see :mod:`emokern.experiments.sandbox` for what it refuses and why it is no wall).

This file is not imported: its text is executed in the child inside a private namespace (its own copy of the
builtins), and nothing in the child's modules keeps a reference to the hook.
"""

def make_hook(workdir, read_roots, read_files, report, getcwd, write_flags, gc_disable, gc_enable,
              gc_isenabled):
    process_events = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
        "os.startfile", "os.kill", "os.killpg", "signal.pthread_kill"})
    network_events = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostname", "socket.getnameinfo"})
    guard_events = frozenset({
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "os.link", "os.symlink"})
    blocked_imports = frozenset({
        "_posixsubprocess", "ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters"})
    write_path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.truncate": (0,), "os.utime": (0,),
        "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
    read_path_events = {"os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,)}
    def absolute(path):
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        if type(path) is not str:
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "" or part == ".":
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(part)
        return "/" + "/".join(parts)

    def under(path, roots):
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def describe(value):
        kind = type(value)
        if kind is str or kind is bytes or kind is int or kind is float or kind is bool or value is None:
            text = repr(value)
            return text if len(text) <= 200 else text[:200] + "..."
        return "<" + type.__dict__["__name__"].__get__(type(value)) + ">"

    def refuse(event, args):
        detail = ", ".join(describe(a) for a in args)
        try:
            report((event + "(" + detail + ")").replace("\n", " "))
        except OSError:
            pass
        raise PermissionError("sandbox: " + event + "(" + detail + ") is not allowed")

    def check_path(event, args, path, writing):
        if type(path) is int:  # an open file descriptor: it was opened through this hook
            return
        where = absolute(path)
        if where is None:
            refuse(event, args)
        if writing:
            if not under(where, (workdir,)):
                refuse(event, args)
        elif not (under(where, read_roots) or where in read_files):
            refuse(event, args)

    def hook(event, args):
        # no garbage collection while the hook decides: a gc callback of the code's would run in the middle of the
        # check (and could, say, change the working directory between the path check and the call)
        collecting = gc_isenabled()
        gc_disable()
        try:
            check(event, args)
        finally:
            if collecting:
                gc_enable()

    def check(event, args):
        if event in process_events or event in network_events or event in guard_events:
            refuse(event, args)
        elif event == "import":
            if type(args[0]) is not str or args[0] in blocked_imports:
                refuse(event, args[:1])
        elif event == "open":
            path, flags = args[0], args[2]
            writing = type(flags) is int and (flags & write_flags) != 0
            check_path(event, args, path, writing)
        elif event in write_path_events:
            for i in write_path_events[event]:
                check_path(event, args, args[i], True)
        elif event in read_path_events:
            for i in read_path_events[event]:
                check_path(event, args, args[i], False)

    return hook
