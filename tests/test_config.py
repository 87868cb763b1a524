"""The settings table: validation, parsing, precedence, and the README table.

No Redis server and no conftest are needed; every environment is a plain
dict, except in the one test that checks os.environ is the default.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.connection import parse_url

from greenpool import config, keepalive
from greenpool.config import SETTINGS, SETTINGS_BY_NAME, parse, resolve, validate
from greenpool.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.rst"
START, END = ".. settings-table-start", ".. settings-table-end"

DEFAULTS = {
    "url": None, "max_connections": 50, "timeout": 20.0, "max_waiters": None,
    "name": None, "idle_timeout": 300.0, "min_idle": 0, "max_lifetime": 3600.0,
    "validation_window": 0.5, "health_check_interval": 0.0,
    "socket_keepalive": True, "keepalive_idle": 30.0, "keepalive_interval": 5.0,
    "keepalive_count": 3, "tcp_user_timeout": None,
    "keepalive_ping_interval": None, "leak_detection_threshold": None,
    "socket_timeout": None, "socket_connect_timeout": 10.0, "client_name": None,
}


def raises(message: str) -> Any:
    """Expect a ConfigError whose whole message is exactly *message*."""
    return pytest.raises(ConfigError, match=f"^{re.escape(message)}$")


# -- the table ---------------------------------------------------------------


def test_table_has_the_documented_defaults() -> None:
    """Every setting of the issue is in the table, with its documented default."""
    assert {s.name: s.default for s in SETTINGS} == DEFAULTS
    assert list(SETTINGS_BY_NAME) == [s.name for s in SETTINGS]


def test_variables_are_keywords_in_capitals() -> None:
    """Each variable name is its keyword in capitals."""
    assert [s.env for s in SETTINGS] == [s.name.upper() for s in SETTINGS]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_defaults_are_valid_and_normalised(setting: config.Setting) -> None:
    """Each default passes its own validation unchanged, type included."""
    value = validate(setting.name, setting.default)
    assert value == setting.default
    assert type(value) is type(setting.default)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_descriptions_are_one_sentence(setting: config.Setting) -> None:
    """Each description is a single sentence that starts capitalised or with code."""
    text = setting.description
    assert text.endswith(".") and ". " not in text
    assert text[0].isupper() or text.startswith("redis-py")


def test_setting_is_frozen() -> None:
    """A Setting cannot be changed after the fact."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        SETTINGS[0].default = 1  # type: ignore[misc]


# -- validate(): values given in Python --------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("max_connections", 0, "max_connections must be an integer >= 1 (got 0)"),
        ("max_connections", True, "max_connections must be an integer >= 1 (got True)"),
        ("max_connections", "10", "max_connections must be an integer >= 1 (got '10')"),
        ("max_connections", 2.5, "max_connections must be an integer >= 1 (got 2.5)"),
        ("max_connections", None, "max_connections must be an integer >= 1 (got None)"),
        ("max_connections", math.inf, "max_connections must be an integer >= 1 (got inf)"),
        ("min_idle", -1, "min_idle must be an integer >= 0 (got -1)"),
        ("max_waiters", False,
         "max_waiters must be an integer >= 0 or None (got False)"),
        ("timeout", "soon",
         "timeout must be a number of seconds >= 0 or None (got 'soon')"),
        ("timeout", math.nan, "timeout must be a number of seconds >= 0 or None (got nan)"),
        ("timeout", math.inf, "timeout must be a number of seconds >= 0 or None (got inf)"),
        ("timeout", -0.1, "timeout must be a number of seconds >= 0 or None (got -0.1)"),
        ("timeout", True, "timeout must be a number of seconds >= 0 or None (got True)"),
        ("idle_timeout", 0,
         "idle_timeout must be a number of seconds > 0 or None (got 0)"),
        ("keepalive_idle", 0.5,
         "keepalive_idle must be a number of seconds >= 1 or None (got 0.5)"),
        ("validation_window", None,
         "validation_window must be a number of seconds >= 0 (got None)"),
        ("socket_keepalive", 1, "socket_keepalive must be True or False (got 1)"),
        ("socket_keepalive", "yes", "socket_keepalive must be True or False (got 'yes')"),
        ("name", "", "name must be a non-empty string or None (got '')"),
        ("client_name", 5, "client_name must be a non-empty string or None (got 5)"),
        ("url", "localhost:6379",
         "url must be a Redis URL (redis://, rediss:// or unix://) or None "
         "(got 'localhost:6379')"),
    ],
)
def test_validate_rejects(name: str, value: Any, message: str) -> None:
    """validate() names the parameter, the expected form and the value received."""
    with raises(message):
        validate(name, value)


@pytest.mark.parametrize(
    ("name", "value", "normalised"),
    [
        ("max_connections", 7, 7),
        ("max_connections", 2.0, 2),
        ("timeout", 0, 0.0),
        ("timeout", None, None),
        ("timeout", 3, 3.0),
        ("timeout", datetime.timedelta(milliseconds=250), 0.25),
        ("max_waiters", 0, 0),
        ("socket_keepalive", False, False),
        ("name", "cache", "cache"),
        ("url", "unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_validate_accepts_and_normalises(name: str, value: Any, normalised: Any) -> None:
    """Good values come back in their normal type: int, float, bool or str."""
    result = validate(name, value)
    assert result == normalised
    assert type(result) is type(normalised)


def test_validate_names_where() -> None:
    """The where argument replaces the keyword name in the message."""
    with raises("URL query option timeout must be a number of seconds >= 0 or None "
                "(got -1)"):
        validate("timeout", -1, where="URL query option timeout")


def test_validate_hides_url_password() -> None:
    """A password in a rejected URL never appears in the message."""
    with pytest.raises(ConfigError, match=re.escape("'http://user:***@host'")) as info:
        validate("url", "http://user:s3cret@host")
    assert "s3cret" not in str(info.value)


def test_validate_unknown_setting() -> None:
    """Validating a name that is not a setting is an error."""
    with raises("unknown setting 'max_conections'"):
        validate("max_conections", 5)


# -- validate_all(): values and relations ------------------------------------


def test_validate_all_normalises_known_and_keeps_unknown() -> None:
    """Known keys are normalised; redis-py's keys pass through untouched."""
    marker = object()
    result = config.validate_all({"max_connections": 5.0, "db": 3, "x": marker})
    assert result == {"max_connections": 5, "db": 3, "x": marker}
    assert type(result["max_connections"]) is int


def test_min_idle_above_max_connections() -> None:
    """min_idle may not exceed max_connections."""
    with raises("min_idle must be <= max_connections (got min_idle=6, max_connections=5)"):
        config.validate_all({"min_idle": 6, "max_connections": 5})
    assert config.validate_all({"min_idle": 5, "max_connections": 5})["min_idle"] == 5


def test_relations_use_defaults_for_missing_settings() -> None:
    """A missing setting takes its default when relations are checked."""
    with raises("min_idle must be <= max_connections (got min_idle=51, max_connections=50)"):
        config.validate_all({"min_idle": 51})


def test_tcp_user_timeout_needs_keepalive() -> None:
    """tcp_user_timeout is refused when socket_keepalive is off."""
    with raises("tcp_user_timeout requires socket_keepalive=True, as it is applied with "
                "redis-py's keepalive options (got tcp_user_timeout=5.0, "
                "socket_keepalive=False)"):
        config.validate_all({"tcp_user_timeout": 5, "socket_keepalive": False})
    assert config.validate_all({"tcp_user_timeout": 5})["tcp_user_timeout"] == 5.0


def test_ping_interval_may_exceed_idle_timeout() -> None:
    """Pings do not reset the idle clock, so no relation to idle_timeout is imposed."""
    options = {"keepalive_ping_interval": 600, "idle_timeout": 60}
    assert config.validate_all(options) == {
        "keepalive_ping_interval": 600.0, "idle_timeout": 60.0,
    }


# -- parse(): environment and URL text ---------------------------------------


@pytest.mark.parametrize(
    ("text", "value"), [("10", 10), (" 10 ", 10), ("1", 1), ("007", 7)]
)
def test_parse_int(text: str, value: int) -> None:
    """Integers are plain digits."""
    assert parse("max_connections", text, where="GREENPOOL_MAX_CONNECTIONS") == value


@pytest.mark.parametrize("text", ["10.5", "ten", "-1", "", "1e3", "+5", "0", "1_000"])
def test_parse_int_rejects(text: str) -> None:
    """Fractions, words, signs, exponents, blanks and out-of-range integers fail."""
    with raises(f"GREENPOOL_MAX_CONNECTIONS must be an integer >= 1 (got {text!r})"):
        parse("max_connections", text, where="GREENPOOL_MAX_CONNECTIONS")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1.5s", 1.5),
     ("1h", 3600.0), ("30S", 30.0), (".5", 0.5), ("1ms", 0.001), ("300MS", 0.3)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations take an optional unit: ms, s, m or h."""
    value = parse("idle_timeout", text, where="GREENPOOL_IDLE_TIMEOUT")
    assert value == seconds and type(value) is float


@pytest.mark.parametrize(
    "text", ["5 minutes", "-1", "nan", "inf", "1e3", "", "30 s", "5min", "1d", "s", "."]
)
def test_parse_duration_rejects(text: str) -> None:
    """Anything but a plain number with a known unit fails, with the pinned wording."""
    with raises("GREENPOOL_IDLE_TIMEOUT must be a duration such as 30, 30s or 500ms "
                f"(got {text!r})"):
        parse("idle_timeout", text, where="GREENPOOL_IDLE_TIMEOUT")


def test_parse_duration_bounds() -> None:
    """A well-formed duration out of range names the bound."""
    with raises("GREENPOOL_IDLE_TIMEOUT must be a duration > 0 or none (got '0ms')"):
        parse("idle_timeout", "0ms", where="GREENPOOL_IDLE_TIMEOUT")
    with raises("GREENPOOL_KEEPALIVE_IDLE must be a duration >= 1 or none (got '500ms')"):
        parse("keepalive_idle", "500ms", where="GREENPOOL_KEEPALIVE_IDLE")
    assert parse("timeout", "0", where="GREENPOOL_TIMEOUT") == 0.0


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("YES", True), ("On", True),
     ("0", False), ("false", False), ("No", False), ("OFF", False)],
)
def test_parse_bool(text: str, value: bool) -> None:
    """Booleans are 1/true/yes/on or 0/false/no/off, in any case."""
    assert parse("socket_keepalive", text, where="GREENPOOL_SOCKET_KEEPALIVE") is value


@pytest.mark.parametrize("text", ["flase", "", "2", "y", "enabled", "none"])
def test_parse_bool_rejects(text: str) -> None:
    """Any other word is an error, never silently True."""
    with raises("GREENPOOL_SOCKET_KEEPALIVE must be a boolean: 1, true, yes, on, 0, "
                f"false, no or off (got {text!r})"):
        parse("socket_keepalive", text, where="GREENPOOL_SOCKET_KEEPALIVE")


@pytest.mark.parametrize("text", ["none", "None", "NONE", " none "])
def test_parse_none_where_allowed(text: str) -> None:
    """none, in any case, is None for settings that allow it."""
    assert parse("timeout", text, where="GREENPOOL_TIMEOUT") is None
    assert parse("max_waiters", text, where="GREENPOOL_MAX_WAITERS") is None
    assert parse("name", text, where="GREENPOOL_NAME") is None


def test_parse_none_where_not_allowed() -> None:
    """none is an error for settings that need a value."""
    with raises("GREENPOOL_MAX_CONNECTIONS must be an integer >= 1 (got 'none')"):
        parse("max_connections", "none", where="GREENPOOL_MAX_CONNECTIONS")
    with raises("GREENPOOL_VALIDATION_WINDOW must be a duration such as 30, 30s or "
                "500ms (got 'none')"):
        parse("validation_window", "none", where="GREENPOOL_VALIDATION_WINDOW")


def test_parse_strings() -> None:
    """Strings are taken as given; empty ones and non-Redis URLs are refused."""
    assert parse("name", "cache", where="GREENPOOL_NAME") == "cache"
    assert parse(SETTINGS_BY_NAME["url"], "rediss://h:1/2", where="X") == "rediss://h:1/2"
    with raises("GREENPOOL_NAME must be a non-empty string or none (got '')"):
        parse("name", "", where="GREENPOOL_NAME")
    with raises("GREENPOOL_URL must be a Redis URL (redis://, rediss:// or unix://) or "
                "none (got 'http://h')"):
        parse("url", "http://h", where="GREENPOOL_URL")


# -- resolve(): precedence and sources ---------------------------------------


def test_resolve_defaults() -> None:
    """With nothing given, every setting has its default and source default."""
    resolved = resolve({})
    assert dict(resolved.options) == DEFAULTS
    assert set(resolved.sources.values()) == {"default"}
    assert resolved.url is None


def test_resolve_environment() -> None:
    """GREENPOOL_* variables are parsed and reported as environment."""
    resolved = resolve({"GREENPOOL_MAX_CONNECTIONS": "7", "GREENPOOL_TIMEOUT": "500ms",
                        "GREENPOOL_MAX_WAITERS": "none", "PATH": "/bin"})
    assert (resolved.options["max_connections"], resolved.options["timeout"]) == (7, 0.5)
    assert resolved.options["max_waiters"] is None
    assert resolved.sources["max_connections"] == "environment"
    assert resolved.sources["max_waiters"] == "environment"
    assert resolved.sources["min_idle"] == "default"


def test_resolve_precedence() -> None:
    """Argument beats URL query, which beats environment, which beats default."""
    environ = {"GREENPOOL_MAX_CONNECTIONS": "9", "GREENPOOL_TIMEOUT": "9",
               "GREENPOOL_IDLE_TIMEOUT": "1m"}
    resolved = resolve(environ, url="redis://h/0?max_connections=5&timeout=2",
                       overrides={"max_connections": 4})
    got = {k: (resolved.options[k], resolved.sources[k]) for k in
           ("max_connections", "timeout", "idle_timeout", "min_idle")}
    assert got == {"max_connections": (4, "argument"), "timeout": (2.0, "url"),
                   "idle_timeout": (60.0, "environment"), "min_idle": (0, "default")}


def test_resolve_explicit_none_is_an_argument() -> None:
    """An override of None is explicit: it beats the environment."""
    resolved = resolve({"GREENPOOL_TIMEOUT": "5"}, overrides={"timeout": None})
    assert resolved.options["timeout"] is None
    assert resolved.sources["timeout"] == "argument"


def test_resolve_validates_arguments() -> None:
    """Overrides are validated like keyword arguments."""
    with raises("max_connections must be an integer >= 1 (got True)"):
        resolve({}, overrides={"max_connections": True})


def test_resolve_passes_other_keywords_through() -> None:
    """Overrides that are not settings (redis-py kwargs) reach options unchanged."""
    resolved = resolve({}, overrides={"db": 2, "password": "pw"})
    assert (resolved.options["db"], resolved.options["password"]) == (2, "pw")


def test_resolve_strips_our_query_options_from_url() -> None:
    """Our query options move into options; redis-py's stay in the URL."""
    resolved = resolve({}, url="redis://:pw@h:6379/0?db=1&max_connections=5"
                                "&protocol=3&idle_timeout=none#frag")
    assert resolved.url == "redis://:pw@h:6379/0?db=1&protocol=3#frag"
    assert resolved.options["url"] == resolved.url
    assert resolved.options["idle_timeout"] is None
    kwargs = parse_url(resolved.url)
    assert "max_connections" not in kwargs and "idle_timeout" not in kwargs
    # redis-py 4.6 leaves protocol a string; later versions parse it.
    assert (kwargs["db"], int(kwargs["protocol"])) == (1, 3)


def test_resolve_keeps_unix_url_intact() -> None:
    """A unix:// URL keeps its three slashes once its query is stripped."""
    resolved = resolve({}, url="unix:///tmp/redis.sock?timeout=1")
    assert resolved.url == "unix:///tmp/redis.sock"
    assert parse_url(resolved.url)["path"] == "/tmp/redis.sock"


def test_resolve_url_query_greenpool_settings_are_strict() -> None:
    """greenpool's own query options: a bad, blank or repeated value names the option."""
    with raises("URL query option idle_timeout must be a duration such as 30, 30s or "
                "500ms (got '5 minutes')"):
        resolve({}, url="redis://h?idle_timeout=5 minutes")
    with raises("URL query option min_idle must be an integer >= 0 (got '')"):
        resolve({}, url="redis://h?min_idle=")
    with raises("URL query option min_idle is given more than once"):
        resolve({}, url="redis://h?min_idle=1&min_idle=2")


def test_resolve_url_query_redis_py_options_mean_what_redis_py_says() -> None:
    """Options redis-py's parse_url types keep its meaning: its parser, blanks
    ignored, the first of several wins; greenpool then checks the bounds."""
    url = "redis://h?socket_keepalive=&socket_timeout=2.5&max_connections=7&max_connections=9"
    options = resolve({}, url=url).options
    assert (options["socket_keepalive"], options["socket_timeout"]) == (True, 2.5)
    assert options["max_connections"] == 7
    assert parse_url(url)["max_connections"] == 7  # redis-py's own reading
    with pytest.raises(ValueError, match="Invalid value for .max_connections."):
        resolve({}, url="redis://h?max_connections=ten")
    with raises("URL query option max_connections must be an integer >= 1 (got 0)"):
        resolve({}, url="redis://h?max_connections=0")


def test_resolve_url_from_environment_has_query_options() -> None:
    """Query options of a URL from the environment still count as url."""
    resolved = resolve({"GREENPOOL_URL": "redis://h?min_idle=2"})
    assert resolved.sources["url"] == "environment"
    assert (resolved.options["min_idle"], resolved.sources["min_idle"]) == (2, "url")


def test_resolve_url_argument_beats_environment() -> None:
    """url= beats overrides['url'], which beats GREENPOOL_URL and REDIS_URL."""
    environ = {"GREENPOOL_URL": "redis://env", "REDIS_URL": "redis://fallback"}
    assert resolve(environ).url == "redis://env"
    assert resolve(environ, overrides={"url": "redis://kw"}).url == "redis://kw"
    resolved = resolve(environ, url="redis://arg", overrides={"url": "redis://kw"})
    assert (resolved.url, resolved.sources["url"]) == ("redis://arg", "argument")


def test_resolve_redis_url_fallback() -> None:
    """REDIS_URL is read when GREENPOOL_URL is unset, and named in its errors."""
    resolved = resolve({"REDIS_URL": "redis://fallback:6380"})
    assert (resolved.url, resolved.sources["url"]) == (
        "redis://fallback:6380", "environment")
    with raises("REDIS_URL must be a Redis URL (redis://, rediss:// or unix://) or "
                "none (got 'fallback:6380')"):
        resolve({"REDIS_URL": "fallback:6380"})


def test_resolve_unknown_variable_suggests() -> None:
    """A misspelt variable is an error naming the closest known variable."""
    with raises("unknown environment variable GREENPOOL_MAX_CONECTIONS "
                "(did you mean GREENPOOL_MAX_CONNECTIONS?)"):
        resolve({"GREENPOOL_MAX_CONECTIONS": "5"})


def test_resolve_unknown_variables_listed() -> None:
    """Several unknown variables are all listed, sorted, with or without a hint."""
    with raises("unknown environment variables GREENPOOL_QQQ, GREENPOOL_TIMOUT "
                "(did you mean GREENPOOL_TIMEOUT?)"):
        resolve({"GREENPOOL_TIMOUT": "1", "GREENPOOL_QQQ": "1"})


def test_resolve_ignores_tool_variables() -> None:
    """GREENPOOL_REDIS_SERVER and names passed in ignore are not settings errors."""
    environ = {"GREENPOOL_REDIS_SERVER": "/usr/bin/redis-server", "GREENPOOL_X": "1"}
    assert resolve(environ, ignore=["GREENPOOL_X"]).sources["url"] == "default"


def test_resolve_custom_prefix() -> None:
    """Another prefix reads, and checks, its own variables only."""
    environ = {"APP_REDIS_MIN_IDLE": "3", "GREENPOOL_MIN_IDLE": "9"}
    assert resolve(environ, prefix="APP_REDIS_").options["min_idle"] == 3
    with raises("unknown environment variable APP_REDIS_MIN_IDEL "
                "(did you mean APP_REDIS_MIN_IDLE?)"):
        resolve({"APP_REDIS_MIN_IDEL": "3"}, prefix="APP_REDIS_")
    with pytest.raises(ValueError, match="prefix must not be empty"):
        resolve({}, prefix="")


def test_resolve_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an environ argument, os.environ is read."""
    for name in [n for n in os.environ if n.startswith("GREENPOOL_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("GREENPOOL_MIN_IDLE", "2")
    assert resolve().options["min_idle"] == 2


def test_resolve_checks_relations_across_sources() -> None:
    """Relations are checked on the final values, whatever their sources."""
    with raises("min_idle must be <= max_connections (got min_idle=10, "
                "max_connections=5)"):
        resolve({"GREENPOOL_MIN_IDLE": "10"}, overrides={"max_connections": 5})


def test_resolved_is_frozen_and_redacted() -> None:
    """Resolved cannot be changed, and its repr hides the URL password."""
    resolved = resolve({}, url="redis://user:s3cret@h?timeout=1")
    with pytest.raises(TypeError):
        resolved.options["timeout"] = 2  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.url = None  # type: ignore[misc]
    assert repr(resolved) == ("Resolved(url='redis://user:***@h', "
                              "sources={'url': 'argument', 'timeout': 'url'})")


# -- the pool's helpers ------------------------------------------------------


def test_connection_kwargs_tcp() -> None:
    """TCP connections get keepalive options built from the settings."""
    options = config.resolve({}, overrides={"tcp_user_timeout": 4, "socket_timeout": 2}).options
    kwargs = config.connection_kwargs(options, redis.SSLConnection)
    assert kwargs == {
        "health_check_interval": 0.0, "socket_timeout": 2.0,
        "socket_connect_timeout": 10.0, "client_name": None, "socket_keepalive": True,
        "socket_keepalive_options": keepalive.socket_options(
            idle=30, interval=5, count=3, user_timeout=4),
    }


def test_connection_kwargs_keepalive_off_and_unix() -> None:
    """Keepalive off sends no options; Unix sockets get no keepalive arguments."""
    options = config.resolve({}, overrides={"socket_keepalive": False}).options
    kwargs = config.connection_kwargs(options, redis.Connection)
    assert (kwargs["socket_keepalive"], kwargs["socket_keepalive_options"]) == (False, {})
    unix = config.connection_kwargs(options, redis.UnixDomainSocketConnection)
    assert "socket_keepalive" not in unix and "socket_keepalive_options" not in unix
    redis.UnixDomainSocketConnection(path="/nonexistent", **unix)  # accepted


# -- describe() and the README table -----------------------------------------


def test_describe_rows() -> None:
    """describe() gives variable, keyword, default text and description per setting."""
    rows = config.describe()
    assert [row[1] for row in rows] == [s.name for s in SETTINGS + config.TOPOLOGY_SETTINGS]
    by_name = {row[1]: row for row in rows}
    assert by_name["max_connections"] == (
        "GREENPOOL_MAX_CONNECTIONS", "max_connections", "50",
        SETTINGS_BY_NAME["max_connections"].description)
    assert [by_name[n][2] for n in ("timeout", "validation_window", "socket_keepalive",
                                    "url", "health_check_interval")] == [
        "20s", "0.5s", "true", "none", "0s"]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_default_text_parses_back(setting: config.Setting) -> None:
    """Each default as printed parses back to the default itself, but those
    left to redis-py, which say so."""
    (row,) = [r for r in config.describe() if r[1] == setting.name]
    if setting.name in config._CONNECTION_DEFAULTS:
        assert row[2] == "redis-py's"
        return
    assert parse(setting, row[2], where=row[0]) == setting.default


@pytest.mark.parametrize("connection_class", [redis.Connection, redis.UnixDomainSocketConnection])
def test_socket_timeout_not_set_is_the_connection_classs_own(connection_class) -> None:
    """Not set, socket_timeout is not passed: the connection keeps redis-py's
    default (5 s in redis-py 8); set, even to none, it is passed."""
    default = connection_class().socket_timeout
    assert "socket_timeout" not in config.split({}, default_class=connection_class).connection_kwargs
    assert connection_class(**config.split({}, default_class=connection_class).connection_kwargs).socket_timeout == default
    for given in (None, 2.5):
        split = config.split({"socket_timeout": given}, default_class=connection_class)
        assert split.connection_kwargs["socket_timeout"] == given
    split = config.split({}, environ={"GREENPOOL_SOCKET_TIMEOUT": "none"}, default_class=connection_class)
    assert split.connection_kwargs["socket_timeout"] is None


def test_readme_table_lists_every_setting() -> None:
    """The RST table has a header row and one row per setting, in table order."""
    table = config.readme_table()
    assert table.startswith(".. list-table::\n   :header-rows: 1\n")
    variables = re.findall(r"^   \* - ``(\w+)``$", table, flags=re.M)
    assert variables == [f"GREENPOOL_{s.env}" for s in SETTINGS + config.TOPOLOGY_SETTINGS]
    for setting in SETTINGS + config.TOPOLOGY_SETTINGS:
        assert f"     - {setting.description}\n" in table


def test_readme_contains_generated_table() -> None:
    """README.rst holds exactly the table readme_table() generates."""
    text = README.read_text(encoding="utf-8") if README.exists() else ""
    assert START in text and END in text, f"README.rst lost its '{START}' / '{END}' markers"
    between = text.split(START, 1)[1].split(END, 1)[0]
    assert between.strip() == config.readme_table().strip(), (
        "README.rst's settings table is stale: paste greenpool.config.readme_table()")


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("sentinels", "127.0.0.1:26379, [::1]:26380", [("127.0.0.1", 26379), ("::1", 26380)]),
        ("sentinel_role", "Replica", "replica"),
        ("cluster_nodes", "h:7000", [("h", 7000)]),
    ],
)
def test_topology_settings_parse(name: str, text: str, expected: Any) -> None:
    """Sentinel and cluster variables parse strictly, as the pool's do."""
    assert config.parse(name, text, where="X") == expected


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("sentinels", "127.0.0.1", "X must be a comma-separated list of host:port such as "
         "127.0.0.1:26379,127.0.0.1:26380 (got '127.0.0.1')"),
        ("sentinels", "h:70000", "X must be a comma-separated list of host:port such as "
         "127.0.0.1:26379,127.0.0.1:26380 (got 'h:70000')"),
        ("sentinel_role", "primary", "X must be master or replica (got 'primary')"),
    ],
)
def test_topology_settings_reject(name: str, text: str, message: str) -> None:
    """A malformed address list or role names the variable and the value."""
    with raises(message):
        config.parse(name, text, where="X")


def test_topology_variables_are_known() -> None:
    """GREENPOOL_SENTINELS and friends are not reported as unknown variables."""
    environ = {"GREENPOOL_SENTINELS": "h:1", "GREENPOOL_SENTINEL_SERVICE": "s",
               "GREENPOOL_SENTINEL_ROLE": "master", "GREENPOOL_CLUSTER_NODES": "h:2"}
    assert config.resolve(environ).sources["max_connections"] == "default"
