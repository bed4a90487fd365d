"""A local Kubernetes cluster made of the real control-plane binaries, a node agent and MinIO.

    python -m qlora_localcluster build   # compile the binaries once into the user cache
    python -m qlora_localcluster up      # start etcd, apiserver, kcm, scheduler, MinIO, node agent
    eval "$(python -m qlora_localcluster env)" && kubectl get nodes
    python -m qlora_localcluster down
"""
