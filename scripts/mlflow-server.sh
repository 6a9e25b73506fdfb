#!/usr/bin/env bash
# The search's own MLflow tracking server: SQLite backend, artifacts proxied by the server to
# --artifacts-destination (workers upload through it; no shared file system needed for artifacts),
# MLflow's basic-auth app on, bound to one address (this machine's private address by default).
#
#   scripts/mlflow-server.sh start    # in the background; returns once /health answers (idempotent)
#   scripts/mlflow-server.sh stop     # stops the server this script started (by its pid file)
#   scripts/mlflow-server.sh credentials   # only create the login file if missing (before `ray up`)
#
# Settings (environment):
#   SPNTUNE_MLFLOW_HOME       state: mlflow.db, basic_auth.db, server.log, pid file, Flask key
#                             (default ~/spntune-mlflow; keep it on persistent storage)
#   SPNTUNE_MLFLOW_ARTIFACTS  where the server stores artifacts: s3://bucket/prefix, gs://..., or a
#                             path on shared storage (default $SPNTUNE_MLFLOW_HOME/artifacts)
#   SPNTUNE_MLFLOW_HOST       address to bind (default: this machine's first private address)
#   SPNTUNE_MLFLOW_PORT       port (default 5000)
#   SPNTUNE_MLFLOW_WORKERS    server worker processes (default 2)
#   SPNTUNE_CREDENTIALS       MLflow login as environment lines MLFLOW_TRACKING_USERNAME=...,
#                             MLFLOW_TRACKING_PASSWORD=... (default ~/.spntune/mlflow.env). Generated
#                             here at first start if missing (mode 600); the same file on every node
#                             gives the trials their login through the environment (see cluster.yaml).
#   SPNTUNE_PYTHON            Python with spntune's lock installed (default: the repo's .venv, else python3)
#
# The password is never printed: this script names the file that holds it, nothing more.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
home="${SPNTUNE_MLFLOW_HOME:-$HOME/spntune-mlflow}"
artifacts="${SPNTUNE_MLFLOW_ARTIFACTS:-$home/artifacts}"
port="${SPNTUNE_MLFLOW_PORT:-5000}"
workers="${SPNTUNE_MLFLOW_WORKERS:-2}"
credentials="${SPNTUNE_CREDENTIALS:-$HOME/.spntune/mlflow.env}"
python="${SPNTUNE_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
pidfile="$home/server.pid"
log="$home/server.log"

die() { echo "mlflow-server: $*" >&2; exit 1; }

private_address() {
    local addr
    addr="$(hostname -I 2>/dev/null | awk '{print $1}')"
    [[ -n "$addr" ]] || die "cannot tell this machine's private address; set SPNTUNE_MLFLOW_HOST"
    echo "$addr"
}

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

healthy() {  # 0 once http://host:port/health answers 200
    "$python" - "$1" <<'EOF'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
}

make_secret() { "$python" -c 'import secrets; print(secrets.token_urlsafe(32))'; }

credentials() {  # MLflow ships no default admin password: make one, once
    if [[ ! -s "$credentials" ]]; then
        ( umask 077; mkdir -p "$(dirname "$credentials")"
          printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$(make_secret)" > "$credentials" )
        echo "mlflow-server: generated the MLflow login in $credentials (mode 600)"
    else
        echo "mlflow-server: the MLflow login is in $credentials"
    fi
}

start() {
    local host url
    host="${SPNTUNE_MLFLOW_HOST:-$(private_address)}"
    url="http://$host:$port"
    if running; then
        echo "mlflow-server: already running (pid $(cat "$pidfile")) at $url"
        return 0
    fi
    "$python" -c 'import flask_wtf' 2>/dev/null \
        || die "$python lacks mlflow[auth] (Flask-WTF): install spntune from requirements.lock (make install)"
    ( umask 077; mkdir -p "$home" "$(dirname "$credentials")" )
    [[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
    credentials
    if [[ ! -s "$home/flask_secret_key" ]]; then  # CSRF key of the basic-auth app, server side only
        ( umask 077; make_secret > "$home/flask_secret_key" )
    fi
    # Where the auth app keeps its users; no password in it (the admin's comes from the environment).
    cat > "$home/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$home/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Trials send many small requests: check a login's PBKDF2 hash once a minute, not on every request.
auth_cache_ttl_seconds = 60
EOF
    local user password
    user="$(sed -n 's/^MLFLOW_TRACKING_USERNAME=//p' "$credentials")"
    password="$(sed -n 's/^MLFLOW_TRACKING_PASSWORD=//p' "$credentials")"
    [[ -n "$user" && -n "$password" ]] \
        || die "$credentials lacks MLFLOW_TRACKING_USERNAME= or MLFLOW_TRACKING_PASSWORD= lines"
    # setsid: the server outlives the SSH session of `ray up`; its pid is its process group.
    MLFLOW_AUTH_CONFIG_PATH="$home/basic_auth.ini" \
    MLFLOW_AUTH_ADMIN_USERNAME="$user" \
    MLFLOW_AUTH_ADMIN_PASSWORD="$password" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$home/flask_secret_key")" \
        setsid nohup "$python" -m mlflow server --app-name basic-auth \
            --backend-store-uri "sqlite:///$home/mlflow.db" \
            --artifacts-destination "$artifacts" \
            --host "$host" --port "$port" --workers "$workers" \
            >"$log" 2>&1 </dev/null &
    echo $! > "$pidfile"
    for _ in $(seq 1 240); do  # first start creates both databases: up to a minute on a slow disk
        if healthy "$url/health"; then
            echo "mlflow-server: serving $url (pid $(cat "$pidfile"), basic auth, artifacts -> $artifacts, log $log)"
            return 0
        fi
        running || die "the server exited; see $log"
        sleep 0.5
    done
    die "no answer from $url/health after 120 s; see $log"
}

stop() {
    if running; then
        local pid
        pid="$(cat "$pidfile")"
        kill -- "-$pid" 2>/dev/null || kill "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 -- "-$pid" 2>/dev/null || true
        echo "mlflow-server: stopped (pid $pid)"
    else
        echo "mlflow-server: not running"
    fi
    rm -f "$pidfile"
}

case "${1:-}" in
    start) start ;;
    credentials) credentials ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop|credentials   (settings: see the top of this file)" >&2; exit 2 ;;
esac
