"""Django settings for Switchyard: every value comes from the environment.

See README.md ("Configuration") for the list of variables and their defaults.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from psycopg.conninfo import conninfo_to_dict

from billing.schedule import BILLING_BEAT_SCHEDULE
from marketplace.client_ip import parse_networks
from marketplace.env import env_bool, env_float, env_int, env_list, env_str
from vendors.schedule import VENDORS_BEAT_SCHEDULE

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("SWITCHYARD_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    configured = env_str("SECRET_KEY", "")
    if configured:
        return configured
    if not DEBUG and not env_bool("SWITCHYARD_ALLOW_GENERATED_SECRET", True):
        raise ImproperlyConfigured("SECRET_KEY is required in production")
    # Development and tests: a random key kept in the git-ignored data folder, so that
    # sessions and encrypted secrets survive a restart without anyone committing a key.
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        try:
            with path.open("x") as handle:
                handle.write(key)
        except FileExistsError:
            return path.read_text().strip()
        return key


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000").rstrip("/")

# HTTPS hardening for production (behind a TLS-terminating proxy); off by default so that
# `make run` and the tests work over plain http on loopback.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True


def _derived_key(purpose: str) -> bytes:
    return hashlib.sha256(f"switchyard:{purpose}:{SECRET_KEY}".encode()).digest()


# Keyed hash for API keys (HMAC-SHA256). Changing it invalidates every API key.
API_KEY_PEPPER = env_str("API_KEY_PEPPER", _derived_key("api-key").hex())
# Fernet keys for vendor secrets at rest, newest first (MultiFernet: rotate by prepending).
FIELD_ENCRYPTION_KEYS = env_list(
    "FIELD_ENCRYPTION_KEYS", [base64.urlsafe_b64encode(_derived_key("fields")).decode()]
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "channels",
    "marketplace",
    "vendors",
    "routing",
    "billing",
]

MIDDLEWARE = [
    "marketplace.logs.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
]

ROOT_URLCONF = "marketplace.urls"
ASGI_APPLICATION = "marketplace.asgi.application"

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


def _database_from_url(url: str) -> dict[str, object]:
    if not url.startswith(("postgres://", "postgresql://")):
        raise ImproperlyConfigured("DATABASE_URL must be a postgresql:// URL")
    try:
        info = conninfo_to_dict(url)
    except Exception as exc:
        raise ImproperlyConfigured(f"DATABASE_URL cannot be parsed: {exc}") from None
    options: dict[str, object] = {"sslmode": info["sslmode"]} if "sslmode" in info else {}
    pool_size = env_int("DATABASE_POOL_MAX_SIZE", 10, minimum=0)
    if pool_size:
        # psycopg 3's connection pool (Django >= 5.1): workers and the gateway's rare
        # cache-miss queries borrow a connection instead of opening one.
        options["pool"] = {
            "min_size": 1,
            "max_size": pool_size,
            "timeout": 10,
            # A failed connection attempt is retried with exponential backoff for this long,
            # then the next request starts afresh: so after a PostgreSQL outage the pool
            # reconnects within seconds, not after a backoff grown to minutes.
            "reconnect_timeout": env_int("DATABASE_POOL_RECONNECT_SECONDS", 10, minimum=1),
        }
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": info.get("dbname", "postgres"),
        "USER": info.get("user", ""),
        "PASSWORD": info.get("password", ""),
        "HOST": info.get("host", ""),
        "PORT": info.get("port", ""),
        # With the pool, Django returns connections to it after each request (age 0).
        "CONN_MAX_AGE": 0 if pool_size else env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
        "CONN_HEALTH_CHECKS": not pool_size,
        "OPTIONS": options,
        "TEST": {"NAME": env_str("DATABASE_TEST_NAME", "test_switchyard")},
    }


DATABASE_URL = env_str("DATABASE_URL")
DATABASES = {"default": _database_from_url(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "sy:cache",
    }
}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 reads with a 5 s socket timeout by default, exactly channels_redis'
            # 5 s BZPOPMIN: an idle consumer's read would time out and kill its socket.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "health_check_interval": 30}],
            "prefix": "sy:channels",
        },
    }
}

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
# A usage entry read by a consumer that died is claimed by another after this long.
USAGE_CLAIM_IDLE_MS = env_int("USAGE_CLAIM_IDLE_MS", 30_000, minimum=100)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Separate queues so a slow Stripe call or a probe round never delays metering; run workers
# per queue to isolate them (docker-compose.yml does), or one worker on all of them.
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "billing.tasks.usage_ingest": {"queue": "ingest"},
    "billing.tasks.rollups_recent": {"queue": "ingest"},
    "routing.tasks.*": {"queue": "ingest"},
    "vendors.tasks.*": {"queue": "probes"},
    "billing.tasks.*": {"queue": "payments"},
}
CELERY_QUEUES_ALL = "ingest,probes,payments,default"
LIVE_PUSH_INTERVAL_SECONDS = env_float("LIVE_PUSH_INTERVAL_SECONDS", 2.0)
CELERY_BEAT_SCHEDULE = {
    "usage-ingest": {
        "task": "billing.tasks.usage_ingest",
        "schedule": env_float("USAGE_INGEST_INTERVAL_SECONDS", 1.0),
        # Each run drains the whole stream, so runs queued while the workers were stuck (a
        # PostgreSQL outage) are dropped rather than worked off one by one afterwards.
        "options": {"expires": 30},
    },
    "trace-ingest": {
        "task": "routing.tasks.trace_ingest",
        "schedule": env_float("TRACE_INGEST_INTERVAL_SECONDS", 2.0),
        "options": {"expires": 30},
    },
    "trace-prune": {"task": "routing.tasks.trace_prune", "schedule": 3600.0},
    # Live dashboards: the gateway's live numbers to the vendor and operations pages.
    "live-numbers-push": {
        "task": "marketplace.tasks.live_numbers_push",
        "schedule": LIVE_PUSH_INTERVAL_SECONDS,
        "options": {"expires": LIVE_PUSH_INTERVAL_SECONDS},
    },
    **VENDORS_BEAT_SCHEDULE,
    **BILLING_BEAT_SCHEDULE,
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = env_str("ACCOUNT_EMAIL_VERIFICATION", "mandatory")
# allauth's limits on the unauthenticated account pages, counted in the Redis cache per client
# IP (marketplace.client_ip, through the adapter) and per e-mail address ("key").
ACCOUNT_ADAPTER = "marketplace.adapters.AccountAdapter"
ACCOUNT_RATE_LIMITS = {
    "login": "30/m/ip",
    "login_failed": "10/m/ip,5/300s/key",
    "signup": "20/m/ip",
    "reset_password": "20/m/ip,5/m/key",
    "reset_password_from_key": "20/m/ip",
    "request_login_code": "20/m/ip,3/m/key",
}
LOGIN_REDIRECT_URL = "/"
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "switchyard@localhost")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # A bearer API key first, so an unauthenticated request gets 401 with WWW-Authenticate.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.api_auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Switchyard management API",
    "DESCRIPTION": "Organisations' API keys, usage and money; vendors' endpoints and "
    "statements. Authenticate with a session or `Authorization: Bearer <API key>`.",
    "VERSION": "1.0.0",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_INCLUDE_SCHEMA": False,
    # What Django's path converters accept, so clients (and schemathesis) know it.
    "PATH_CONVERTER_OVERRIDES": {
        "slug": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
        "int": {"type": "integer", "minimum": 0},
    },
}

# --- the gateway (routing/) -------------------------------------------------------------
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 1_048_576, minimum=1024)
GATEWAY_MAX_MESSAGES = env_int("GATEWAY_MAX_MESSAGES", 256, minimum=1)
GATEWAY_DEFAULT_MAX_TOKENS = env_int("GATEWAY_DEFAULT_MAX_TOKENS", 512, minimum=1)
GATEWAY_CONNECT_TIMEOUT = env_float("GATEWAY_CONNECT_TIMEOUT", 3.0)
GATEWAY_FIRST_BYTE_TIMEOUT = env_float("GATEWAY_FIRST_BYTE_TIMEOUT", 30.0)
GATEWAY_TOTAL_TIMEOUT = env_float("GATEWAY_TOTAL_TIMEOUT", 120.0)
# Capacity slots and credit holds of a request live this long at most: if its gateway dies,
# they come back after it (the hold sweep runs every GATEWAY_HOLD_SWEEP_SECONDS).
GATEWAY_LEASE_SECONDS = env_int("GATEWAY_LEASE_SECONDS", 300, minimum=2)
GATEWAY_HOLD_SWEEP_SECONDS = env_float("GATEWAY_HOLD_SWEEP_SECONDS", 10.0)
if GATEWAY_LEASE_SECONDS <= GATEWAY_TOTAL_TIMEOUT and not env_bool(
    "GATEWAY_ALLOW_SHORT_LEASES", False
):
    raise ImproperlyConfigured("GATEWAY_LEASE_SECONDS must exceed GATEWAY_TOTAL_TIMEOUT")
GATEWAY_MAX_UPSTREAM_BODY_BYTES = env_int("GATEWAY_MAX_UPSTREAM_BODY_BYTES", 8_388_608)
GATEWAY_KEY_CACHE_SECONDS = env_float("GATEWAY_KEY_CACHE_SECONDS", 60.0)
# After a failed database read the gateway serves from its caches without trying the
# database again for this long (each try may wait for the pool's timeout).
GATEWAY_DB_RETRY_SECONDS = env_float("GATEWAY_DB_RETRY_SECONDS", 5.0)
# Changes are pushed over pub/sub; this periodic reload only covers a lost message.
GATEWAY_SNAPSHOT_REFRESH_SECONDS = env_float("GATEWAY_SNAPSHOT_REFRESH_SECONDS", 300.0)
GATEWAY_REDIS_MAX_CONNECTIONS = env_int("GATEWAY_REDIS_MAX_CONNECTIONS", 512, minimum=4)
# Where the console's playground calls the gateway; empty: this process's own address.
PLAYGROUND_GATEWAY_URL = env_str("PLAYGROUND_GATEWAY_URL", "")
# Redis's copy of each route trace; PostgreSQL keeps them TRACE_RETENTION_DAYS (routing.traces).
GATEWAY_TRACE_TTL_SECONDS = env_int("GATEWAY_TRACE_TTL_SECONDS", 3_600, minimum=60)
# Traces waiting in the sy:traces stream for PostgreSQL (routing.traces): beyond this many
# the oldest are dropped, so a stalled ingest cannot fill Redis with them.
GATEWAY_TRACE_STREAM_MAXLEN = env_int("GATEWAY_TRACE_STREAM_MAXLEN", 200_000, minimum=1_000)
# How long PostgreSQL keeps route traces (GET /v1/generation, feedback) before the hourly prune.
TRACE_RETENTION_DAYS = env_int("TRACE_RETENTION_DAYS", 30, minimum=1)
# Settlements Redis could not take (it was down after a vendor answered) wait here.
SWITCHYARD_SPOOL_DIR = env_str("SWITCHYARD_SPOOL_DIR", str(VAR_DIR / "spool"))
GATEWAY_LIVE_REFRESH_SECONDS = env_float("GATEWAY_LIVE_REFRESH_SECONDS", 0.25)
# A refresh reads only the endpoints whose numbers changed (routing.live.LiveCache), and all
# of them this often; changes are marked with the writing replica's clock, so each refresh
# also re-reads what changed in the last GATEWAY_LIVE_CLOCK_SKEW_SECONDS.
GATEWAY_LIVE_FULL_REFRESH_SECONDS = env_float("GATEWAY_LIVE_FULL_REFRESH_SECONDS", 60.0)
GATEWAY_LIVE_CLOCK_SKEW_SECONDS = env_float("GATEWAY_LIVE_CLOCK_SKEW_SECONDS", 0.5)
# Freeze start-up's objects out of the garbage collector's reach (routing/gateway/gcpause.py),
# and once more after this many requests: full collections then pause for a fraction.
GATEWAY_GC_FREEZE = env_bool("GATEWAY_GC_FREEZE", True)
GATEWAY_GC_REFREEZE_AFTER = env_int("GATEWAY_GC_REFREEZE_AFTER", 2000, minimum=0)
# Young-generation threshold once start-up is frozen; 0 keeps CPython's 700. Higher means
# fewer but longer pauses (see routing/gateway/gcpause.py for the measured trade-off).
GATEWAY_GC_YOUNG_THRESHOLD = env_int("GATEWAY_GC_YOUNG_THRESHOLD", 0, minimum=0)
GATEWAY_CIRCUIT_FAILURES = env_int("GATEWAY_CIRCUIT_FAILURES", 5, minimum=1)
GATEWAY_CIRCUIT_COOLDOWN_SECONDS = env_float("GATEWAY_CIRCUIT_COOLDOWN_SECONDS", 30.0)
# Fallback retries in flight across all replicas: at most max(MIN, RATIO x requests in flight).
GATEWAY_RETRY_BUDGET_RATIO = env_float("GATEWAY_RETRY_BUDGET_RATIO", 0.2)
GATEWAY_RETRY_BUDGET_MIN = env_int("GATEWAY_RETRY_BUDGET_MIN", 3, minimum=0)
# Response cache (opt-in per key or request): the longest TTL a request may ask for, the
# largest answer kept, and how many semantic-cache entries each organisation keeps.
GATEWAY_CACHE_MAX_TTL_SECONDS = env_int("GATEWAY_CACHE_MAX_TTL_SECONDS", 86_400, minimum=1)
GATEWAY_CACHE_MAX_ANSWER_BYTES = env_int("GATEWAY_CACHE_MAX_ANSWER_BYTES", 262_144, minimum=1024)
GATEWAY_CACHE_SEMANTIC_ENTRIES = env_int("GATEWAY_CACHE_SEMANTIC_ENTRIES", 256, minimum=1)
# Networks that vendor URLs may point into although they are private or loopback
# (self-hosted vendors, the demo and the tests). Empty in production by default.
OUTBOUND_ALLOWED_NETWORKS = env_list("OUTBOUND_ALLOWED_NETWORKS", [])
# Failed authentications (bad, revoked or expired keys) one client IP may make per minute
# across all replicas before it is refused with 429 until the minute ends; 0 turns it off.
GATEWAY_AUTH_FAILURES_PER_MINUTE = env_int("GATEWAY_AUTH_FAILURES_PER_MINUTE", 20, minimum=0)

# --- money (billing/) ----------------------------------------------------------------
PLATFORM_FEE_BPS = env_int("PLATFORM_FEE_BPS", 2000, minimum=0)  # 20.00 %
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET", "")
STRIPE_CONNECT_WEBHOOK_SECRET = env_str("STRIPE_CONNECT_WEBHOOK_SECRET", "")
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "https://api.stripe.com")
STRIPE_WEBHOOK_TOLERANCE_SECONDS = env_int("STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300, minimum=1)
STRIPE_MAX_NETWORK_RETRIES = env_int("STRIPE_MAX_NETWORK_RETRIES", 2, minimum=0)
STRIPE_TIMEOUT_SECONDS = env_int("STRIPE_TIMEOUT_SECONDS", 30, minimum=1)
TOPUP_MIN_CENTS = env_int("TOPUP_MIN_CENTS", 500, minimum=50)
TOPUP_MAX_CENTS = env_int("TOPUP_MAX_CENTS", 1_000_000, minimum=100)
INVOICE_DAYS_UNTIL_DUE = env_int("INVOICE_DAYS_UNTIL_DUE", 30, minimum=1)

# Addresses or networks of our own reverse proxies / load balancers. Only a connection from
# one of them has its X-Forwarded-For read for the client IP (marketplace/client_ip.py).
TRUSTED_PROXIES = env_list("TRUSTED_PROXIES", [])
parse_networks(TRUSTED_PROXIES)  # fails early on a typo
# Accept a client's X-Request-ID (only behind a proxy that sets or sanitises it).
TRUST_REQUEST_ID_HEADER = env_bool("TRUST_REQUEST_ID_HEADER", False)
LOG_FORMAT = env_str("LOG_FORMAT", "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "marketplace.logs.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "marketplace.logs.JsonFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
