"""A node agent that is not a kubelet: it registers Nodes that advertise (emulated) GPUs and runs
every container of the pods bound to them as a plain process on this host.

One process per node name (the local cluster starts one per GPU node):

    python -m qlora_localcluster.nodeagent --node-name gpu-node-0 \\
        --kubeconfig .localcluster/kubeconfigs/gpu-node-0.kubeconfig \\
        --gpus 1 --gpu-product NVIDIA-H100-80GB-HBM3 --port 20250 \\
        --tls-cert-file pki/kubelet-serving.crt --tls-private-key-file pki/kubelet-serving.key \\
        --client-ca-file pki/ca.crt --root-dir .localcluster/nodes/gpu-node-0

`python -m qlora_localcluster.nodeagent --help` lists every flag. Modules, Kubernetes-facing first:

    node.py             Node registration, Lease and status heartbeats
    pods.py             watch of this node's pods, pods/status reports, final grace-0 deletes
    log_server.py       HTTPS /containerLogs for `kubectl logs [-f]` through the API server
    process_runtime.py  the provider (virtual-kubelet's interface): pods as host processes
    pod_run.py          one pod's lifecycle: volumes, init containers, restarts, OOM and deadline kills
    container_process.py  one container = one process group
    launch.py           argv/env/workingDir from a container spec; the container->host path rule
    in_cluster.py       the kubeconfig that stands in for in-cluster config (a pod's ServiceAccount token)
    volumes.py          configMap/secret/emptyDir/downwardAPI/projected/hostPath as directories
    image_table.py      image name -> host ENTRYPOINT/CMD
    status.py           kubelet-style pod status, phase and conditions (pure)
    logs.py             CRI-format log files and the reader behind /containerLogs

What it does not do: see README.md next to this file.
"""
