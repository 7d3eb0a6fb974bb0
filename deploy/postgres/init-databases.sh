#!/bin/sh
# First start of the PostgreSQL container only (docker-entrypoint-initdb.d): one role and one
# database each for taskapp and Keycloak, with the passwords of the env file. Neither role is
# a superuser, and neither may connect to the other's database.
set -eu

psql --username "$POSTGRES_USER" --dbname postgres --set ON_ERROR_STOP=1 \
    --set taskapp_password="$TASKAPP_DB_PASSWORD" \
    --set keycloak_password="$KEYCLOAK_DB_PASSWORD" <<'SQL'
CREATE ROLE taskapp LOGIN PASSWORD :'taskapp_password';
CREATE DATABASE taskapp OWNER taskapp;
REVOKE ALL ON DATABASE taskapp FROM PUBLIC;

CREATE ROLE keycloak LOGIN PASSWORD :'keycloak_password';
CREATE DATABASE keycloak OWNER keycloak;
REVOKE ALL ON DATABASE keycloak FROM PUBLIC;
SQL
