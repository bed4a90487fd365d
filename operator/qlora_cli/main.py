"""The `qlora` command group: kubectl-style connection options, then one module per command."""

import functools

import click

from qlora_cli.kube import KubeOptions, KubeSession


def kube_options(command):
    """--kubeconfig/--context/--namespace, accepted before and after the subcommand (kubectl
    users type `kubectl qlora watch my-job -n team-a`)."""

    @click.option("--kubeconfig", envvar="KUBECONFIG", default=None, metavar="PATH",
                  help="Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).")
    @click.option("--context", default=None, help="Kubeconfig context (default: the current context).")
    @click.option("-n", "--namespace", default=None, help="Namespace (default: the context's, else default).")
    @functools.wraps(command)
    def wrapper(*args, kubeconfig, context, namespace, **kwargs):
        ctx = click.get_current_context()
        given = KubeOptions(kubeconfig, context, namespace)
        parent = ctx.find_object(KubeOptions)
        ctx.obj = parent.merged(given) if parent else given
        return command(*args, **kwargs)

    return wrapper


def session() -> KubeSession:
    """The cluster session for the running command (made on first use: --dry-run needs none)."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.meta.get("qlora.session"), KubeSession):
        root.meta["qlora.session"] = KubeSession(ctx.find_object(KubeOptions) or KubeOptions())
    return root.meta["qlora.session"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@kube_options
def cli():
    """Fine-tune with QLoRAJobs: submit, watch, fetch, try and serve adapters."""


def register() -> None:
    from qlora_cli import describe, fetch, listing, logs, serve, submit, trying, watch

    for module in (submit, watch, listing, describe, logs, fetch, trying, serve):
        for command in module.COMMANDS:
            cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    register()
    try:
        cli.main(args=argv, prog_name="qlora", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    return 0
