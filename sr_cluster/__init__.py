"""VDVAE-SR beyond one machine, on Ray: a batch job over a cluster and an HTTP service.

Needs the `cluster` extra (`pip install 'vdvae-sr[cluster]'`); `sr_runtime`
never imports this package or Ray, so the plain runtime stays light.
"""
