"""Layer 7: the node daemon (`agentnode run`), its control API and the CLI that talks to it.

`config` reads agentnode.toml, `runner` turns queued tasks into isolated processes, `api` serves
the control API on a unix socket, `daemon` ties them together, `client` and `commands` are the
CLI side (`submit`, `ps`, `logs`, `wait`, `kill`, `top`).
"""
