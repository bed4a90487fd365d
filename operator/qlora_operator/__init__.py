"""The QLoRAJob operator: kopf at the edge, plain functions inside.

    main.py          kopf handlers (one call each) and `qlora-operator` start-up
    kopf_setup.py    kopf's own settings: annotation storage, no event posting, standalone
    settings.py      QLORA_* environment variables and flags
    reconcile.py     one reconcile: read -> observe -> derive -> plan -> apply
    kube.py          the only module that talks to the API server
    observation.py   the children of a QLoRAJob grouped by attempt, progress from log lines
    attempts.py      what happened to an attempt; retries, deadlines (pure)
    pod_facts.py     readers for Job/pod status fields (pure)
    derivation.py    derive_status(job, observed) -> (status, events) (pure)
    planning.py      plan_actions(job, observed, status) -> creates/patches (pure)
    rendering.py     render_config_map / render_trainer_job -> dicts (pure)
    conditions.py    metav1.Condition bookkeeping
    naming.py        child names and labels
    resource.py      the QLoRAJob as read from the API server
    metrics.py       Prometheus metrics
"""
