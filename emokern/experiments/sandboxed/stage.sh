# Run as root, as the text of `sh -c` (bwrap.py reads it at import; launch_command runs it), before dropping to
# SANDBOX_UID. argv: stage dir, n, n source paths, then the command. In a private mount namespace of its own
# (unshare --mount --propagation private), a small tmpfs on the stage directory gets a read-only bind of each source at
# "<stage>/<i>", so that bwrap, started as an unprivileged user, can bind paths that only root can reach (a Python
# installed under /root). Nothing is mounted in the host's namespace; the stage directory stays empty there.
set -eu
stage=$1; n=$2; shift 2
mount -t tmpfs -o mode=0755,size=64k emokern-stage "$stage"
i=0
while [ "$i" -lt "$n" ]; do
    if [ -d "$1" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
    mount --bind "$1" "$stage/$i"
    mount -o remount,bind,ro "$stage/$i"
    shift; i=$((i + 1))
done
exec "$@"
