from emokern.cli import main

# The guard matters: engines that start worker processes with "spawn" (vLLM) import __main__ again in each child.
if __name__ == "__main__":
    raise SystemExit(main())
