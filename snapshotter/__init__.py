"""lazyfs's containerd snapshotter: containerd's snapshots API served over a unix socket.

``store`` keeps metadata in SQLite, ``overlay`` lays snapshots out on disk and returns overlayfs mounts,
``backend`` is the seam where remote (lazy) snapshots plug in, ``service`` is the gRPC servicer (with
``filters`` for List and ``errors`` for status codes), ``server`` runs it, and ``setup`` writes
containerd's config. ``api`` holds the stubs generated from ``proto/`` by scripts/gen-protos.sh.
"""
