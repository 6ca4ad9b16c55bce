"""`gmv demo`: index scikit-learn's digits on the embedded Milvus, start `gmv serve` on it, and
attribute held-out digits through the client SDK, as a model-serving stack would."""
from __future__ import annotations

import signal
import subprocess
import sys

from gmv_engine.errors import MissingWeightsError
from gmv_engine.settings import Settings, add_config_flag, add_flags, from_args

from .common import EXIT_OK, device, format_table, open_index
from .index import print_ingest_report, run_ingest


def register(commands) -> None:
    demo = commands.add_parser("demo", help="index scikit-learn's digits and attribute held-out digits")
    demo.add_argument("--profile", dest="demo_profile", default="auto", choices=["auto", "paper", "offline"],
                      help="auto: paper when its weights are present, otherwise offline")
    demo.add_argument("--workdir", default=".gmv/demo", help="where the demo writes its images")
    demo.add_argument("--show", type=int, default=5, help="held-out images to attribute")
    demo.add_argument("--collection", default="digits_demo")
    add_config_flag(demo)
    add_flags(demo, groups=("milvus", "models"))


def run(args) -> int:
    from gmv_engine.datasets import export_digits, read_heldout
    from gmv_engine.ingest import read_manifest
    from gmv_engine.milvus.embedded import free_port

    settings = from_args(args)
    device_name = device(settings)
    profile, components = demo_profile(args.demo_profile, device_name)
    print(f"profile: {profile.name} - {profile.description}")
    export = export_digits(args.workdir)
    print(f"dataset: scikit-learn digits as 32x32 RGB PNGs in {export.root}: "
          f"{export.train_count} training images (contributor = class folder), {export.heldout_count} held out")
    collection = f"{args.collection}_{profile.name}"
    with open_index(settings) as index:
        report = run_ingest(index, collection, read_manifest(export.manifest), settings.with_(profile=profile.name),
                            device_name, True, components)
        print_ingest_report(report, collection)
        del components  # the server loads its own
        port = free_port()
        command = [sys.executable, "-m", "gmv_server.cli", "serve", "--collection", collection, "--port", str(port),
                   "--milvus-uri", index.uri, "--device", device_name, "--host", "127.0.0.1",
                   "--data-dir", settings.data_dir]
        if index.feature_store is not None:  # where this run put the re-rank features
            command += ["--feature-store", index.feature_store.uri]
        print(f"\nstarting the server: gmv serve --collection {collection} --port {port} (on the same Milvus)")
        server = subprocess.Popen(command)
        try:
            return through_server(f"127.0.0.1:{port}", read_heldout(export.heldout)[: args.show], collection)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def through_server(target: str, heldout, collection: str) -> int:
    from gmv_client import GMVClient

    with GMVClient(target) as client:
        info = client.wait_until_ready()
        print(f"server ready: {info.collection} ({info.index_type} {dict(info.index_params)}, {info.row_count} rows, "
              f"re-rank {info.reranker}, quality {info.quality})")
        # Ids are per collection: a rerun replays the ledger's records instead of paying twice.
        labels = {f"demo-{collection}-{path.stem}": (path, label) for path, _, label in heldout}
        results = list(client.attribute_stream([(f"demo-{collection}-{path.stem}", path.read_bytes())
                                                for path, _, _ in heldout], tenant_id="demo"))
        top = client.top_contributors(limit=5, tenant_id="demo")
    same_class = []
    for result in sorted(results, key=lambda r: r.generation_id):
        path, label = labels[result.generation_id]
        if result.error_code:
            print(f"\nheld-out digit {label} ({result.generation_id}) failed: {result.error_code}: {result.error_message}")
            continue
        print(f"\nheld-out digit {label} ({result.generation_id}, {result.ledger} in the ledger):")
        print(format_table(result.generation_id, path, result))
        same_class.append(sum(c.contributor_id == f"digit-{label}" for c in result.credits) / len(result.credits))
    print(f"\nshare of top-{len(results[0].credits)} training images from the generation's own class: "
          f"{sum(same_class) / len(same_class):.3f} (the paper's criterion C1)")
    print(f"\nroyalty ledger: {top.generations} demo generations recorded, total credit {top.total_credit:.4f}; "
          "top contributors (`gmv ledger top --tenant demo`):")
    for item in top.items:
        print(f"  {item.contributor_id:<10} {item.value:.4f} over {item.generations} generations")
    return EXIT_OK


def demo_profile(requested: str, device_name: str):
    """The paper profile when its weights load, else offline, saying which and why:
    (profile, (encoder, re-ranker))."""
    from gmv_engine.models import ModelPool
    from gmv_engine.profiles import get_profile

    if requested in ("auto", "paper"):
        paper = get_profile("paper")
        models = ModelPool(device_name)
        try:
            components = (models.get("encoder", paper.encoder), models.get("reranker", paper.reranker))
            models.get("quality", paper.quality)
            return paper, components
        except MissingWeightsError as exc:
            if requested == "paper":
                raise
            print(f"paper profile unavailable: {exc}")
            print("falling back to the offline profile, which needs no pretrained weights.")
    offline = get_profile("offline")
    models = ModelPool(device_name)
    return offline, (models.get("encoder", offline.encoder), models.get("reranker", offline.reranker))
