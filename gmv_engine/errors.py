"""Errors the engine raises. Each maps to one gRPC status in the server (see server/)."""


class GMVError(Exception):
    """Base of every error GMV reports to a user."""


class InvalidImageError(GMVError):
    """The image bytes are empty, undecodable, too large or a decompression bomb (INVALID_ARGUMENT)."""


class InvalidArgumentError(GMVError):
    """A request parameter is out of range (INVALID_ARGUMENT)."""


class CollectionNotFoundError(GMVError):
    """The named collection does not exist (NOT_FOUND)."""


class IncompatibleCollectionError(GMVError):
    """The collection was built with another encoder/re-ranker than asked for (FAILED_PRECONDITION)."""


class IndexUnavailableError(GMVError):
    """Milvus cannot be reached or failed a call (UNAVAILABLE)."""


class MissingWeightsError(GMVError):
    """Pretrained weights for a model are not on this machine (FAILED_PRECONDITION)."""

    def __init__(self, model: str, detail: str = ""):
        self.model = model
        message = (
            f"pretrained weights for '{model}' are not available on this machine"
            + (f" ({detail})" if detail else "")
            + ". Fetch them where there is network with `gmv models download --model "
            + model
            + "` (or `--profile paper`), or point --model-dir at a folder that holds them."
            " GMV never substitutes random weights."
        )
        super().__init__(message)


class ManifestError(GMVError):
    """The training manifest cannot be read at all (bad header, missing file)."""


class GenerationConflictError(GMVError):
    """A generation_id already recorded with a different image (ALREADY_EXISTS): the ledger
    never overwrites a record."""


class LedgerUnavailableError(GMVError):
    """The ledger's database cannot be reached or failed a write (UNAVAILABLE); nothing of the
    failed record was kept."""


class UnauthenticatedError(GMVError):
    """No credential, or one that is unknown, revoked or expired (UNAUTHENTICATED)."""


class PermissionDeniedError(GMVError):
    """A valid credential without the role, or for another tenant (PERMISSION_DENIED)."""
