"""Configuration: YAML files -> validated, frozen config objects, with ${VAR} expansion."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import phonenumbers
import pycountry
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_PATH = "config/bridge.yaml"
CONFIG_ENV = "POSTBACK_BRIDGE_CONFIG"

CANONICAL_FIELDS = (
    "click_id",
    "status",
    "value",
    "currency",
    "transaction_id",
    "ttclid",
    "ttp",
    "ip",
    "user_agent",
    "email",
    "phone",
    "external_id",
    "pixel",
    "event_time",
    "page_url",
)
EVENT_ID_FIELDS = frozenset({"click_id", "event", "transaction_id", "status", "tracker"})

# TikTok's standard web events, plus legacy names TikTok still converts.
STANDARD_EVENTS = frozenset(
    {
        "AddPaymentInfo",
        "AddToCart",
        "AddToWishlist",
        "ApplicationApproval",
        "CompleteRegistration",
        "Contact",
        "CustomizeProduct",
        "Download",
        "FindLocation",
        "InitiateCheckout",
        "Lead",
        "Purchase",
        "Schedule",
        "Search",
        "StartTrial",
        "SubmitApplication",
        "Subscribe",
        "ViewContent",
        "CompletePayment",
        "SubmitForm",
        "PlaceAnOrder",
        "ClickButton",
    }
)

# ISO 4217 currency codes: TikTok refuses an event with any other, and one refused event fails its batch.
CURRENCIES = frozenset(currency.alpha_3 for currency in pycountry.currencies)
TRACKER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SHELL_VARIABLE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per problem (file: key: why)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Model(BaseModel):
    # Unknown keys are errors: a typo must never pass silently.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: Any) -> Any:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("must be a list of CIDRs")
    try:
        networks = [ipaddress.ip_network(str(item), strict=False) for item in value]
    except ValueError as exc:
        raise ValueError(f"not a CIDR: {exc}") from None
    return [_plain_network(network) for network in networks]


def _plain_network(network: Network) -> Network:
    """`::ffff:10.0.0.0/104` as the IPv4 network it is: client addresses so written are compared as
    IPv4 (mapping.plain_address), so the networks they are checked against must be IPv4 too."""
    mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
    if mapped is None or network.prefixlen < 96:
        return network
    return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")


class ServerConfig(_Model):
    # Non-empty: an empty host would silently listen on every address.
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8080, ge=1, le=65535)
    trusted_proxies: list[Network] = []
    click_limit_per_minute: int = Field(600, ge=0)
    # Processes answering HTTP on the one port; the first also runs the delivery worker. More than one
    # uses more cores for ingest bursts (see docs/benchmarks.md); each holds its own database connection.
    listeners: int = Field(1, ge=1, le=16)
    # /metrics and /readyz: empty token and these networks by default, so a scraper on the
    # VPS itself works while the rest of the internet sees 403.
    metrics_allow_ips: list[Network] = Field(default_factory=lambda: _networks(["127.0.0.0/8", "::1/128"]))
    metrics_token: str = ""

    _cidrs = field_validator("trusted_proxies", "metrics_allow_ips", mode="before")(_networks)


class StorageConfig(_Model):
    path: str = "/var/lib/postback-bridge/bridge.db"


class TikTokConfig(_Model):
    endpoint: str = "https://business-api.tiktok.com/open_api/v1.3/event/track/"
    dry_run: bool = False
    timeout: float = Field(10.0, gt=0, le=300, allow_inf_nan=False)
    batch_size: int = Field(500, ge=1, le=1000)
    partner_name: str = "postback-bridge"

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+/\S*$", value):
            raise ValueError("must be an http(s) URL")
        return value


class PixelConfig(_Model):
    code: str = Field(min_length=1)
    access_token: str
    test_event_code: str = ""


class MatchingConfig(_Model):
    default_phone_region: str = "US"

    @field_validator("default_phone_region")
    @classmethod
    def _region(cls, value: str) -> str:
        value = value.upper()
        if value not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError("not a region code phonenumbers knows (two letters, e.g. US, DE, BR)")
        return value


class DeliveryConfig(_Model):
    max_attempts: int = Field(20, ge=1, le=1000)
    max_event_age: float = Field(604800, gt=0, allow_inf_nan=False)


class RetentionConfig(_Model):
    clicks: float = Field(2592000, gt=0, allow_inf_nan=False)
    finished_conversions: float = Field(7776000, gt=0, allow_inf_nan=False)


class Settings(_Model):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    tiktok: TikTokConfig = TikTokConfig()
    default_pixel: str = "main"
    pixels: dict[str, PixelConfig] = Field(min_length=1)
    matching: MatchingConfig = MatchingConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    trackers_dir: str = "trackers"
    retention: RetentionConfig = RetentionConfig()

    def test_event_pixels(self) -> list[str]:
        """Pixels whose every event goes to TikTok as a test event: a test_event_code set while live."""
        if self.tiktok.dry_run:
            return []
        return sorted(name for name, pixel in self.pixels.items() if pixel.test_event_code)


class EventRoute(_Model):
    event: str | None = Field(min_length=1)  # null: record, never send; "" is a mistake
    pixel: str | None = None


class TrackerConfig(_Model):
    name: str
    key: str = ""
    allow_ips: list[Network] = []
    pixel: str | None = None
    # Validated when left out too: a tracker without a click_id mapping can match nothing.
    params: dict[str, str] = Field(default_factory=dict, validate_default=True)
    events: dict[str, EventRoute] = {}
    default_currency: str = "USD"
    event_id: str = "{click_id}_{event}"

    _cidrs = field_validator("allow_ips", mode="before")(_networks)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TRACKER_NAME.match(value):
            raise ValueError("must be URL-safe: lowercase letters, digits, '-' or '_', at most 64")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CANONICAL_FIELDS))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; fields are {', '.join(CANONICAL_FIELDS)}")
        if "click_id" not in value:
            raise ValueError("click_id must be mapped to the tracker's click id parameter")
        empty = sorted(field for field, name in value.items() if not name)
        if empty:
            raise ValueError(f"{empty[0]}: empty parameter name")
        if "key" in value.values():
            raise ValueError("'key' is reserved for the postback key")
        return value

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        routes: dict[str, Any] = {}
        for status, route in value.items():
            # `sale: Purchase` and `rejected: null` are shorthand for {event: ...}.
            if route is None or isinstance(route, str):
                route = {"event": route}
            name = str(status).strip().lower()
            if name in routes:
                # Statuses match case-insensitively, so `Sale` and `sale` would silently be one.
                raise ValueError(f"status {status!r} is listed twice (statuses are case-insensitive)")
            routes[name] = route
        return routes

    @field_validator("default_currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if value.upper() not in CURRENCIES:
            raise ValueError("must be a three-letter ISO 4217 code")
        return value.upper()

    @field_validator("event_id")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value)]
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from None
        names = {name for name, _, _ in fields if name is not None}
        if any(spec or conv for name, spec, conv in fields if name is not None):
            # `{click_id:d}` would fail on every postback; only plain fields are meant.
            raise ValueError("fields take no format spec or conversion: write {click_id}, not {click_id:...}")
        bad = sorted(names - EVENT_ID_FIELDS)
        if bad:
            raise ValueError(f"unknown field {{{bad[0]}}}; fields are {', '.join(sorted(EVENT_ID_FIELDS))}")
        if "click_id" not in names:
            raise ValueError("must contain {click_id}, or every click would share one event_id")
        return value


def _pixel_name(pixels: Mapping[str, PixelConfig], ref: str | None) -> str | None:
    """The config name of a pixel referred to by name or by code, or None."""
    if not ref:
        return None
    if ref in pixels:
        return ref
    for name, pixel in pixels.items():
        if pixel.code == ref:
            return name
    return None


@dataclass(frozen=True)
class Config:
    """Everything the daemon runs on: the main settings and every tracker, by name."""

    settings: Settings
    trackers: Mapping[str, TrackerConfig]
    path: Path
    warnings: tuple[str, ...] = field(default=())

    @property
    def db_path(self) -> Path:
        return _relative_to(self.path, self.settings.storage.path)

    @property
    def trackers_dir(self) -> Path:
        return _relative_to(self.path, self.settings.trackers_dir)

    def pixel_name(self, ref: str | None) -> str | None:
        return _pixel_name(self.settings.pixels, ref)

    def route_pixel(self, refs: Sequence[str]) -> str:
        """The pixel an event goes to: the first of `refs` (by name or code), else default_pixel.

        A reference can outlive the config (a pixel removed or renamed since the click or postback
        named it). It is returned as written, and `configured()` says it is not there: such an event
        waits for the pixel to come back rather than going to another pixel, which may be another
        advertiser's.
        """
        if refs:
            return _pixel_name(self.settings.pixels, refs[0]) or refs[0]
        return _pixel_name(self.settings.pixels, self.settings.default_pixel) or self.settings.default_pixel

    def configured(self, pixel: str) -> bool:
        return pixel in self.settings.pixels

    def pixel(self, name: str) -> PixelConfig:
        return self.settings.pixels[name]


def _relative_to(config_path: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else config_path.parent / path


def resolve_config_path(arg: str | None, environ: Mapping[str, str] | None = None) -> Path:
    if arg == "":
        # `-c "$CONFIG"` with CONFIG unset: falling back to another file would hide the slip.
        raise ConfigError(["-c/--config: an empty path"])
    environ = os.environ if environ is None else environ
    return Path(arg or environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def expand_env(
    value: Any, environ: Mapping[str, str], where: str, problems: list[str], warnings: list[str] | None = None
) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of a parsed YAML tree; the default is
    taken when VAR is unset or empty, as in the shell.

    Nothing of a value is quoted in a problem or warning: it may be a token or a key."""
    if isinstance(value, dict):
        return {
            k: expand_env(v, environ, f"{where}.{k}" if where else str(k), problems, warnings)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, environ, f"{where}[{i}]", problems, warnings) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    # Any other shell form (`${NAME-default}`, `${NAME:=x}`) would be kept as text, and a token or key
    # would be sent as that text.
    expanded = {match.start() for match in _VAR.finditer(value)}
    for start in (found.start() for found in re.finditer(r"\$\{", value)):
        if start not in expanded:
            problems.append(
                f"{where}: the '${{' at character {start + 1} is not expanded: only ${{NAME}} and"
                " ${NAME:-default} are"
            )
    if warnings is not None and _SHELL_VARIABLE.fullmatch(value):
        # Judged as written, not as expanded: a variable's value may look like this too.
        warnings.append(
            f"{where}: a value of the form $NAME is taken as it is; write ${{NAME}} to use the variable"
        )

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        # As in the shell, `:-` takes the default for a variable set but empty too: an empty
        # `NAME=` line in an env file leaves the default in force, while `${NAME}` stays empty.
        if found is not None and (found or default is None):
            return found
        if default is not None:
            return default
        problems.append(
            f"{where}: environment variable {name} is not set (add {name}=... to the service's env file and"
            f" run commands through `pb`, as docs/deployment.md shows; or write ${{{name}:-default}})"
        )
        return ""

    return _VAR.sub(sub, value)


_MERGE = "tag:yaml.org,2002:merge"


class _SafeUniqueLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no python/* tags: a config file cannot run code), plus two rules:

    - a key written twice in one mapping is an error, where PyYAML would silently keep the last;
    - a key is the text it is written as. Every key of these files is a name (a status, a pixel, a
      setting), and YAML 1.1 would turn some into other things: a network's status `yes: Lead` into
      True, so the status "true", which never matches; `off` into False, `010` into 8. Values are read
      as YAML reads them (`dry_run: yes` is true; `key: off` is refused, not taken as the key "off").
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # `<<: *base` may override on purpose
                continue
            key = self._key(key_node, deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: named below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        self.flatten_mapping(node)  # merges `<<: *base` in, as the safe loader does
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found an unhashable key",
                    key_node.start_mark,
                ) from None
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping

    def _key(self, key_node: yaml.Node, deep: bool) -> Any:
        if isinstance(key_node, yaml.ScalarNode):
            return key_node.value
        return self.construct_object(key_node, deep=deep)


def _read_yaml(
    path: Path, environ: Mapping[str, str], problems: list[str], blamed: set[str], warnings: list[str]
) -> dict[str, Any] | None:
    """The file's mapping with variables expanded; None if it cannot be read or parsed. A key whose
    variable could not be expanded is reported here and added to `blamed` (as `<path>: <key>: `, and
    for a list's item the list's key too), so that what its empty value makes of it later is not
    reported twice."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or exc}")
        return None
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return None
    try:
        data = yaml.load(text, Loader=_SafeUniqueLoader)  # a SafeLoader: safe, never yaml.Loader
    except RecursionError:
        problems.append(f"{path}: YAML nests too deeply (or an alias refers to itself)")
        return None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problems.append(f"{path}: YAML syntax error at {at}{problem}")
        return None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: must be a mapping of keys to values")
        return None
    errors: list[str] = []
    noticed: list[str] = []
    try:
        data = expand_env(data, environ, "", errors, noticed)
    except RecursionError:
        problems.append(f"{path}: YAML nests too deeply (or an alias refers to itself)")
        return None
    problems.extend(f"{path}: {e}" for e in errors)
    warnings.extend(f"{path}: {w}" for w in noticed)
    for error in errors:
        key = error.partition(": ")[0]
        blamed.update({f"{path}: {key}: ", f"{path}: {key.partition('[')[0]}: "})
    return data


def _validation_problems(path: Path, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {key}: {msg}")
    return lines


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the main file and every tracker file; raise ConfigError listing all problems.

    Tracker files are checked even when the main file is invalid, so that one run names every
    problem; only what needs valid settings (pixel names) waits for a valid main file."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    problems: list[str] = []
    blamed: set[str] = set()
    warnings: list[str] = []
    raw = _read_yaml(path, environ, problems, blamed, warnings)
    if raw is None:
        # Nothing says where the tracker files are: the default directory may not be the one meant.
        raise ConfigError(problems)
    settings: Settings | None = None
    invalid: ValidationError | None = None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        invalid = exc
        problems.extend(_unblamed(_validation_problems(path, exc), blamed))
    else:
        problems.extend(_unblamed(_settings_problems(path, settings), blamed))
        warnings.extend(_test_event_warnings(path, settings))
        warnings.extend(_retention_warnings(path, settings))

    trackers: dict[str, TrackerConfig] = {}
    trackers_dir = settings.trackers_dir if settings is not None else _trackers_dir_of(raw, invalid)
    if trackers_dir is None or f"{path}: trackers_dir: " in blamed:
        pass  # unusable, or its variable is unset: any directory read instead would be the wrong one
    elif not (directory := _relative_to(path, trackers_dir)).is_dir():
        problems.append(f"{path}: trackers_dir: {directory} is not a directory")
    elif (unlistable := _unlistable(directory)) is not None:
        # Path.glob would find no file in it without a word, and every postback URL would answer 404.
        problems.append(f"{path}: trackers_dir: cannot list {directory}: {unlistable}")
    else:
        trackers = _read_trackers(directory, settings, environ, problems, blamed, warnings)
    if problems or settings is None:
        raise ConfigError(problems)
    return Config(settings=settings, trackers=trackers, path=path, warnings=tuple(warnings))


def _unblamed(lines: Iterable[str], blamed: set[str]) -> list[str]:
    return [line for line in lines if not any(line.startswith(key) for key in blamed)]


class _TrackersDirOnly(_Model):
    """trackers_dir as Settings reads it, from a main file that is otherwise invalid."""

    model_config = ConfigDict(extra="ignore")
    trackers_dir: str = Settings.model_fields["trackers_dir"].default


def _trackers_dir_of(raw: Mapping[str, Any], invalid: ValidationError | None) -> str | None:
    """trackers_dir of a main file that is otherwise invalid; None when it cannot be told. Not the
    default when the file has a key it does not know: that key may be trackers_dir misspelt, or put
    under another section, and the default directory would not be the one meant."""
    unknown_keys = invalid is not None and any(e["type"] == "extra_forbidden" for e in invalid.errors())
    if unknown_keys and "trackers_dir" not in raw:
        return None
    try:
        return _TrackersDirOnly.model_validate(raw).trackers_dir
    except ValidationError:
        return None  # named already among the main file's problems


def _unlistable(directory: Path) -> str | None:
    """Why the files of `directory` cannot be listed, if they cannot (no permission to read it)."""
    try:
        os.listdir(directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _read_trackers(
    trackers_dir: Path,
    settings: Settings | None,
    environ: Mapping[str, str],
    problems: list[str],
    blamed: set[str],
    warnings: list[str],
) -> dict[str, TrackerConfig]:
    """Every tracker file of `trackers_dir`, by name. Without settings (the main file is invalid), the
    checks that need them are left out."""
    warnings.extend(
        f"{file}: not read: tracker files end in .yaml" for file in sorted(trackers_dir.glob("*.yml"))
    )
    trackers: dict[str, TrackerConfig] = {}
    origin: dict[str, Path] = {}
    for file in sorted(trackers_dir.glob("*.yaml")):
        data = _read_yaml(file, environ, problems, blamed, warnings)
        if data is None:
            continue
        try:
            tracker = TrackerConfig.model_validate(data)
        except ValidationError as exc:
            problems.extend(_unblamed(_validation_problems(file, exc), blamed))
            continue
        if tracker.name in trackers:
            problems.append(f"{file}: name: {tracker.name!r} is already used by {origin[tracker.name]}")
            continue
        warnings.extend(_custom_event_warnings(file, tracker))
        if settings is not None:
            problems.extend(_unblamed(_tracker_pixel_problems(file, tracker, settings), blamed))
            warnings.extend(_unblamed(_open_tracker_warnings(file, tracker, settings), blamed))
        warnings.extend(_tracker_warnings(file, tracker))
        trackers[tracker.name] = tracker
        origin[tracker.name] = file
    return trackers


# The permission bits of other users on a directory, what each lets them do, and its chmod letter.
_OTHERS = ((stat.S_IROTH, "list", "r"), (stat.S_IXOTH, "enter", "x"))


def unreadable_by_the_service(config: Config) -> list[str]:
    """Files of the config that the shipped unit's service user could not read, judged by root: the
    files themselves, and the directories on the way to them.

    Root reads any file; that user (DynamicUser) only what other users may: a world-readable file
    reached through directories it may enter (x), in a trackers_dir it may list (r). A file or
    directory created under a strict umask (`install -d -m 700`, umask 077) would pass `check-config`
    run as root, then stop a reload or a start. Said by check-config only: the daemon, whatever user
    it runs as, reads its files or refuses them.
    """
    if os.geteuid() != 0:
        return []  # whoever this is read the files, as the service's user will
    trackers_dir = config.trackers_dir
    files = [config.path, *sorted(trackers_dir.glob("*.yaml"))]
    # Each directory's permission bits other users need: x to pass through it to a file or to
    # trackers_dir, and r on trackers_dir as well, which the daemon lists to find the tracker files.
    needed: dict[Path, int] = {}
    for path in [*files, trackers_dir]:
        for directory in _directories_on_the_way(path):
            needed[directory] = needed.get(directory, 0) | stat.S_IXOTH
    real = trackers_dir.resolve()
    needed[real] = needed.get(real, 0) | stat.S_IROTH | stat.S_IXOTH
    warnings = []
    for directory, bits in sorted(needed.items()):
        try:
            mode = directory.stat().st_mode
        except OSError:
            continue
        missing = [(word, letter) for bit, word, letter in _OTHERS if bits & bit and not mode & bit]
        if not missing:
            continue
        reach = "read the tracker files in it" if bits & stat.S_IROTH else "reach the config files below it"
        warnings.append(
            f"{directory}: a directory other users cannot {' or '.join(word for word, _ in missing)}"
            f" (mode {stat.S_IMODE(mode):03o}), so the service's own user cannot {reach}:"
            f" chmod o+{''.join(letter for _, letter in missing)} {directory}"
        )
    for file in files:
        try:
            mode = file.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IROTH:
            warnings.append(
                f"{file}: not readable by other users (mode {stat.S_IMODE(mode):03o}), so the service's own"
                f" user cannot read it: chmod 644 {file}"
            )
    return warnings


def _directories_on_the_way(path: Path) -> set[Path]:
    """Every directory the system passes through to open `path`, each by its real name: a symbolic
    link's own mode counts for nothing, its target's does."""
    written = Path(os.path.abspath(path))
    return {parent.resolve() for parent in written.parents} | set(path.resolve().parents)


def _settings_problems(path: Path, settings: Settings) -> list[str]:
    # Checked here rather than in a model validator, whose errors carry no key to name.
    problems = []
    if _pixel_name(settings.pixels, settings.default_pixel) is None:
        problems.append(f"{path}: default_pixel: {settings.default_pixel!r} is not one of pixels")
    if not settings.tiktok.dry_run:
        problems.extend(
            f"{path}: pixels.{name}.access_token: empty (allowed only with tiktok.dry_run: true)"
            for name, pixel in settings.pixels.items()
            if not pixel.access_token
        )
    return problems


def _test_event_warnings(path: Path, settings: Settings) -> list[str]:
    """A code left in after `test-event` turns every live event of the pixel into a test event."""
    return [
        f"{path}: pixels.{name}.test_event_code: set, so every event sent for this pixel is a test event"
        " (shown under Test Events, not counted as a conversion); clear it once the test is done"
        for name in settings.test_event_pixels()
    ]


def _retention_warnings(path: Path, settings: Settings) -> list[str]:
    """Repeats are known by the recorded conversions: once one is pruned, a resend is new again."""
    kept, max_age = settings.retention.finished_conversions, settings.delivery.max_event_age
    if kept >= max_age:
        return []
    return [
        f"{path}: retention.finished_conversions: {kept:g} s is shorter than delivery.max_event_age"
        f" ({max_age:g} s): a tracker's resend of a conversion pruned already is taken as new and sent"
        " again (and a rebill after it loses its _{transaction_id} suffix)"
    ]


def _tracker_pixel_problems(file: Path, tracker: TrackerConfig, settings: Settings) -> list[str]:
    problems = []
    if tracker.pixel is not None and _pixel_name(settings.pixels, tracker.pixel) is None:
        problems.append(f"{file}: pixel: {tracker.pixel!r} is not one of pixels in the main config")
    for status, route in tracker.events.items():
        if route.pixel is not None and _pixel_name(settings.pixels, route.pixel) is None:
            problems.append(
                f"{file}: events.{status}.pixel: {route.pixel!r} is not one of pixels in the main config"
            )
    return problems


def _open_tracker_warnings(file: Path, tracker: TrackerConfig, settings: Settings) -> list[str]:
    """A tracker with neither key nor allow_ips takes postbacks from anyone who can reach the bridge.

    Harmless while only the VPS itself can reach it (loopback, no proxy in front), so said only then.
    """
    server = settings.server
    reachable = server.trusted_proxies or not is_loopback(server.host)
    if tracker.key or tracker.allow_ips or not reachable:
        return []
    return [
        f"{file}: key: empty and allow_ips empty, so anyone who finds /postback/{tracker.name} "
        "can report conversions; set a key (or allow_ips)"
    ]


# What a URL's query carries as it is; any other character of a key has to be percent-encoded in the
# postback URL (a '+' would arrive as a space), which is easy to get wrong when pasting it in.
_URL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _tracker_warnings(file: Path, tracker: TrackerConfig) -> list[str]:
    warnings = []
    unsafe = sorted(set(tracker.key) - _URL_SAFE)
    if unsafe and not _SHELL_VARIABLE.fullmatch(tracker.key):  # that one has its own warning
        shown = " ".join(repr(c) for c in unsafe[:5])
        warnings.append(
            f"{file}: key: has characters a URL carries only percent-encoded ({shown}): paste the key"
            " into the postback URL encoded, or use letters and digits only (openssl rand -hex 16)"
        )
    if not any(route.event is not None for route in tracker.events.values()):
        warnings.append(
            f"{file}: events: no status is mapped to an event, so nothing this tracker reports is sent"
        )
    elif "status" not in tracker.params and "" not in tracker.events:
        warnings.append(
            f"{file}: params: no status parameter, so every postback is recorded as ignored"
            " (map status to the tracker's status parameter)"
        )
    return warnings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _custom_event_warnings(file: Path, tracker: TrackerConfig) -> list[str]:
    return [
        f"{file}: events.{status}: {route.event!r} is not a TikTok standard event; "
        "it will be sent as a custom event (check the spelling)"
        for status, route in tracker.events.items()
        if route.event is not None and route.event not in STANDARD_EVENTS
    ]


ResultKind = Literal["accepted", "duplicate", "ignored"]
