-- The keystore schema as version 1 wrote it, kept to prove that a
-- database from that version is migrated in place.
CREATE TABLE keys (
    token        TEXT PRIMARY KEY,
    key_name     TEXT NOT NULL,
    key_alias    TEXT UNIQUE,
    account_type TEXT NOT NULL DEFAULT 'user'
                 CHECK (account_type IN ('user', 'service_account')),
    models       TEXT NOT NULL DEFAULT '[]',
    metadata     TEXT NOT NULL DEFAULT '{}',
    created_at   TEXT NOT NULL,
    blocked      INTEGER NOT NULL DEFAULT 0 CHECK (blocked IN (0, 1)),
    expires_at   TEXT
);
PRAGMA user_version = 1;
