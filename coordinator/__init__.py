"""whimbrel-coordinator: owns the event log and every decision.

Import graph (the architecture): `core` (pure: events, state, evolve, decide) imports nothing with
I/O; `log` knows stored events only; `app` joins them; `servicers` translate gRPC to `app`.
"""
