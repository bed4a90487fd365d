"""The suite's tiny Llama and a small chat dataset in the local cluster's MinIO, for cluster tests
that run the real trainer (the node agent runs it from the trainer image's entry)."""

import boto3
from botocore.config import Config
from trainer_fixtures.runs import jsonl
from trainer_fixtures.tiny_model import build_model, chat_records

MODELS, DATA, ADAPTERS = "reliability-models", "reliability-data", "reliability-adapters"
TINY_MODEL_URI = f"s3://{MODELS}/tiny-llama/"
TRAIN_URI = f"s3://{DATA}/colours/train.jsonl"
TRAINER_IMAGE = "ghcr.io/qlora-operator/trainer:0.1.0"  # the chart's default


def cluster_s3(cluster):
    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}), **cluster.s3_credentials)


def upload_tiny_model_and_data(cluster, folder):
    """Idempotent: other modules of the session may have uploaded the same files already."""
    s3 = cluster_s3(cluster)
    for bucket in (MODELS, DATA, ADAPTERS):
        try:
            s3.create_bucket(Bucket=bucket)
        except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            pass
    build_model(folder)
    for path in folder.iterdir():
        s3.upload_file(str(path), MODELS, f"tiny-llama/{path.name}")
    s3.put_object(Bucket=DATA, Key="colours/train.jsonl", Body=jsonl(chat_records(40, seed=1)))
    return s3


def credentials_secret(cluster, namespace: str, name: str = "minio") -> None:
    from qlora_localcluster.testing import kubectl

    creds = cluster.s3_credentials
    kubectl(cluster, "-n", namespace, "create", "secret", "generic", name,
            f"--from-literal=AWS_ACCESS_KEY_ID={creds['aws_access_key_id']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={creds['aws_secret_access_key']}")


def stage_tiny_run(cluster, namespace: str, folder) -> object:
    """A private cluster made ready for QLoRAJobs that run the real trainer: the namespace, the
    `minio` credentials Secret, buckets models/data/adapters, the tiny model at s3://models/tiny/
    and 400 chat records at s3://data/train.jsonl. Returns the S3 client."""
    from qlora_localcluster.testing import kubectl

    kubectl(cluster, "create", "namespace", namespace)
    credentials_secret(cluster, namespace)
    s3 = cluster_s3(cluster)
    for bucket in ("models", "data", "adapters"):
        s3.create_bucket(Bucket=bucket)
    folder.mkdir()
    build_model(folder)
    for path in folder.iterdir():
        s3.upload_file(str(path), "models", f"tiny/{path.name}")
    s3.put_object(Bucket="data", Key="train.jsonl", Body=jsonl(chat_records(400, seed=1)))
    return s3
