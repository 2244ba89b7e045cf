"""Runs a plan as one role, and orchestrates the three roles.

Modules, in dependency order:

- ``backend``  ``SecureBackend``: one party's execution of each plan op on shares.
- ``session``  the session protocol for each role over already-connected channels: plan
               distribution, batch agreement, seed agreement, the online pass, per-layer stats.
- ``config``   the TOML session file (addresses, certificates, timeouts).
- ``party``    a role as an OS process: TLS listen/connect per the config, then ``session``.
- ``launch``   ``run_local_session``: three processes on loopback with ephemeral certificates.
"""
