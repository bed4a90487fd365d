"""`qlora`: the QLoRAJob command line for the person who wants the adapter.

    qlora submit my-job --model hf://Qwen/Qwen2.5-0.5B --dataset s3://data/chat.jsonl \
        --bucket adapters --secret s3-credentials --watch
    qlora watch my-job          # live progress; exits non-zero when the job fails
    qlora fetch my-job ./adapter
    qlora try my-job --prompt "..."
    qlora serve my-job --for vllm | kubectl apply -f -

Installed as `qlora` and as `kubectl-qlora`, so `kubectl qlora ...` runs it as a kubectl plugin.
It talks to the API server with the user's own kubeconfig (current context and namespace, like
kubectl) and imports only qlora_api from the project: no kopf; torch only for `try` and `eval`.
"""
