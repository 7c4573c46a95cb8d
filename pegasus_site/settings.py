"""Pegasus settings. Everything an operator sets comes from the environment (docs/API.md)."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

DEV_SECRET_KEY = "pegasus-development-key-not-for-production"


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


DEBUG = env_flag("PEGASUS_DEBUG", True)
SECRET_KEY = os.environ.get("PEGASUS_SECRET_KEY", DEV_SECRET_KEY)
ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("PEGASUS_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver").split(",")
    if h.strip()
]

if not DEBUG:
    # Production refuses to start on development defaults (docs/security.md).
    if SECRET_KEY == DEV_SECRET_KEY or len(SECRET_KEY) < 50:
        raise ImproperlyConfigured("Set PEGASUS_SECRET_KEY to a random value of 50+ characters in production.")
    if any(h == "*" or h.startswith("*") for h in ALLOWED_HOSTS) or not ALLOWED_HOSTS:
        raise ImproperlyConfigured("Set PEGASUS_ALLOWED_HOSTS to your host names (no wildcard) in production.")
    SECURE_SSL_REDIRECT = env_flag("PEGASUS_SSL_REDIRECT", True)
    if env_flag("PEGASUS_BEHIND_TLS_PROXY", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = int(os.environ.get("PEGASUS_HSTS_SECONDS", str(365 * 24 * 3600)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("PEGASUS_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "daphne",
    "console.site.ConsoleAdminConfig",  # django.contrib.admin with the console as its default site
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",
    "messaging",
    "messaging.bridges",
    "console",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "pegasus_site.middleware.ContentSecurityPolicyMiddleware",
]

ROOT_URLCONF = "pegasus_site.urls"
ASGI_APPLICATION = "pegasus_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'pegasus.sqlite3'}"
_db = dj_database_url.parse(DATABASE_URL, conn_max_age=0)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN so
    # two writers queue on the busy timeout instead of failing with "database is locked"
    # when a read transaction tries to upgrade.
    _db["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
    }
    # A file, not :memory:, so that daphne processes started by tests share it.
    _db["TEST"] = {"NAME": str(BASE_DIR / f"test-{os.environ.get('PEGASUS_TEST_DB_NAME', 'pegasus')}.sqlite3")}
else:
    # No health check when a pooled connection is borrowed: it is a round trip per database hop
    # (a tenth of a busy server's time). A connection broken meanwhile (PostgreSQL restarted)
    # fails its first statement instead: the request answers 503 with Retry-After, and Django
    # drops the connection rather than giving it back (tests/faults/test_postgres_restart.py).
    _db["CONN_HEALTH_CHECKS"] = False
    _options = _db.setdefault("OPTIONS", {})  # what the URL's query string gave (sslmode=...) stays
    if env_flag("PEGASUS_DB_PREPARE", True):
        # Prepared statements, for the statements that ask for one (messaging/broker/bulk.py:
        # the publish and the ack; ~0.5 ms of parsing and planning saved per publish round,
        # docs/performance.md item 23). Django leaves psycopg's
        # prepare_threshold at None, which refuses even an explicit prepare=True; a threshold
        # out of reach keeps automatic preparation off (Django's own cursors bind on the client
        # and never prepare). A prepared statement is still planned at every execution unless
        # the generic plan is forced. plan_cache_mode applies to every statement bound on the
        # server (bulk.server_cursor), prepared or not: its generic plan expects ten rows from an
        # array parameter, so its joins must not compare each row with each other row
        # (tests/messaging/test_sql_plans.py, docs/performance.md item 26).
        # PEGASUS_DB_PREPARE=0 for a pooler that cannot keep them (PgBouncer in transaction
        # mode before 1.21).
        _options["prepare_threshold"] = 2**31 - 1
        _options["options"] = f"{_options.get('options', '')} -c plan_cache_mode=force_generic_plan".lstrip()
    if env_flag("PEGASUS_DB_POOL", True):
        # A connection pool per process: a request or database_sync_to_async hop borrows a
        # connection instead of opening one (a PostgreSQL backend fork, milliseconds) per request.
        _options["pool"] = {
            "min_size": 1,
            "max_size": int(os.environ.get("PEGASUS_DB_POOL_SIZE", "16")),
            "timeout": 10,
        }
    if os.environ.get("PEGASUS_TEST_DB_NAME"):  # lets several test runs share one server
        _db["TEST"] = {"NAME": os.environ["PEGASUS_TEST_DB_NAME"]}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LOGIN_URL = "/console/login/"

# Typed broker options (messaging/conf.py reads these).
PEGASUS = {
    "DEFAULT_VISIBILITY_TIMEOUT_SECONDS": int(os.environ.get("PEGASUS_VISIBILITY_TIMEOUT", "30")),
    "DEFAULT_MAX_DELIVERIES": int(os.environ.get("PEGASUS_MAX_DELIVERIES", "5")),
    "DEFAULT_DEDUP_WINDOW_SECONDS": 600,
    "DEFAULT_MAX_MESSAGE_BYTES": 1024 * 1024,
    "MAX_BATCH_MESSAGES": 1000,
    "MAX_REQUEST_BYTES": int(os.environ.get("PEGASUS_MAX_REQUEST_BYTES", str(16 * 1024 * 1024))),
    "TRANSACTION_TIMEOUT_SECONDS": int(os.environ.get("PEGASUS_TRANSACTION_TIMEOUT", "60")),
    "ACK_RETENTION_SECONDS": 300,
    "MAINTENANCE_INTERVAL_SECONDS": 5,
    # Limits (docs/security.md). Rates are per token and per server process.
    "PUBLISH_RATE_PER_TOKEN": float(os.environ.get("PEGASUS_PUBLISH_RATE", "2000")),  # messages/s
    "PUBLISH_BURST_PER_TOKEN": int(os.environ.get("PEGASUS_PUBLISH_BURST", "5000")),
    "RATE_LIMIT_ADMINS": env_flag("PEGASUS_RATE_LIMIT_ADMINS", False),
    "MAX_CONNECTIONS_PER_USER": int(os.environ.get("PEGASUS_MAX_CONNECTIONS_PER_USER", "100")),
    "MAX_DESTINATIONS_PER_USER": int(os.environ.get("PEGASUS_MAX_DESTINATIONS_PER_USER", "1000")),
}
DATA_UPLOAD_MAX_MEMORY_SIZE = PEGASUS["MAX_REQUEST_BYTES"]

# Bridges (messaging/bridges/conf.py, docs/bridges.md). TARGETS: the only base URLs a bridge may
# contact, comma-separated; empty means bridges can be configured but forward nowhere.
PEGASUS_BRIDGES = {
    "TARGETS": [u.strip() for u in os.environ.get("PEGASUS_BRIDGE_TARGETS", "").split(",") if u.strip()],
    "REQUEST_TIMEOUT_SECONDS": float(os.environ.get("PEGASUS_BRIDGE_TIMEOUT", "15")),
    "BACKOFF_MAX_SECONDS": float(os.environ.get("PEGASUS_BRIDGE_BACKOFF_MAX", "30")),
}


LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"pegasus": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
