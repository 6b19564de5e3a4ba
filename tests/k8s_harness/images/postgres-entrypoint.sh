#!/usr/bin/env bash
# The node agent's stand-in for the official `postgres` image's entrypoint (docker-library/postgres,
# 15/bookworm/docker-entrypoint.sh), run on Debian bookworm's PostgreSQL 15 server binaries (images.yaml,
# `upstream:`). It keeps the documented contract of that entrypoint, no more:
#   * arguments starting with `-` are options for `postgres`;
#   * on an empty $PGDATA: initdb with the superuser $POSTGRES_USER (default postgres) and the password
#     $POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD=trust) plus $POSTGRES_INITDB_ARGS; pg_hba.conf
#     gets `host all all all ${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}` appended; listen_addresses = '*' (the
#     image's postgresql.conf.sample); a temporary server on the Unix socket only creates $POSTGRES_DB (default
#     $POSTGRES_USER) and runs /docker-entrypoint-initdb.d/*.sh and *.sql, then stops;
#   * then `exec postgres ...` in the foreground (the container's main process), on the default port 5432.
# Not reproduced: the root path's chown of $PGDATA and gosu to the image's postgres user (the agent runs this as
# the container's runAsUser, as tapper's manifest sets), nss_wrapper for arbitrary UIDs, *.sql.gz/xz/zst init
# files, POSTGRES_INITDB_WALDIR, the *_FILE secret variants.
set -Eeo pipefail

if [ "${1:0:1}" = '-' ]; then
  set -- postgres "$@"
fi

if [ "$1" = postgres ] && [ "$(id -u)" != 0 ]; then
  : "${PGDATA:?PGDATA is not set}"
  mkdir -p "$PGDATA"
  chmod 00700 "$PGDATA" || :
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
      echo 'Error: Database is uninitialized and superuser password is not specified.' >&2
      echo '       You must specify POSTGRES_PASSWORD to a non-empty value for the superuser.' >&2
      exit 1
    fi
    : "${POSTGRES_USER:=postgres}"
    : "${POSTGRES_DB:=$POSTGRES_USER}"
    export POSTGRES_USER POSTGRES_DB
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words, as in the image
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") ${POSTGRES_INITDB_ARGS:-}
    printf '\nhost all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"
    sed -ri "s!^#?(listen_addresses)\s*=\s*\S+.*!\1 = '*'!" "$PGDATA/postgresql.conf"
    PGUSER="$POSTGRES_USER" pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p ${PGPORT:-5432}" -w start
    psql_() { psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc "$@"; }
    if [ "$POSTGRES_DB" != postgres ]; then
      psql_ --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db" ;'
    fi
    for f in /docker-entrypoint-initdb.d/*; do
      case "$f" in
        *.sh) echo "running $f"; . "$f" ;;
        *.sql) echo "running $f"; psql_ --dbname "$POSTGRES_DB" -f "$f" ;;
      esac
    done
    PGUSER="$POSTGRES_USER" pg_ctl -D "$PGDATA" -m fast -w stop
    echo 'PostgreSQL init process complete; ready for start up.'
  else
    echo 'PostgreSQL Database directory appears to contain a database; Skipping initialization'
  fi
fi

exec "$@"
