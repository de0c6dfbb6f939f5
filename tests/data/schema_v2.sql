-- The keystore schema as version 2 wrote it, kept to prove that a
-- database from that version is migrated in place.
-- Keystile keystore, schema version 2 (PRAGMA user_version).
-- A database written by an older version is brought here by the scripts in
-- migrations/ (NNN.sql upgrades from version NNN-1), each in one transaction.
-- Times are UTC text in ISO 8601 ('2026-12-04T16:00:00.000Z'), so that the
-- sqlite3 shell shows them readably and they sort correctly as text.

-- One row per virtual key.  The key itself is never stored: it is shown
-- once, when it is created, and only its SHA-256 digest is kept.
CREATE TABLE keys (
    token          TEXT PRIMARY KEY,   -- SHA-256 hex digest of the whole key string
    key_name       TEXT NOT NULL,      -- display form: 'sk-...' and the last 4 characters
    key_alias      TEXT UNIQUE,        -- operator's name for the key; unique when set
    account_type   TEXT NOT NULL DEFAULT 'user'
                   CHECK (account_type IN ('user', 'service_account')),
                                       -- service accounts are held to the required params
    models         TEXT NOT NULL DEFAULT '[]',  -- JSON list of model names; empty = all models
    metadata       TEXT NOT NULL DEFAULT '{}',  -- JSON object, free-form, from the operator
    created_at     TEXT NOT NULL,      -- when the key was generated
    blocked        INTEGER NOT NULL DEFAULT 0 CHECK (blocked IN (0, 1)),
                                       -- 1 = refused until unblocked
    expires_at     TEXT,               -- refused from this time on; NULL = never expires
    user_id        TEXT,               -- owner, as in LiteLLM's key fields
    team_id        TEXT,               -- owning team, as in LiteLLM's key fields
    aliases        TEXT NOT NULL DEFAULT '{}',  -- JSON object: public model name -> model_name
    enforced_params TEXT NOT NULL DEFAULT '[]', -- JSON list of body params this key must send
    rpm_limit      INTEGER,            -- requests per 60 s; NULL = unlimited
    tpm_limit      INTEGER,            -- tokens per 60 s; NULL = unlimited
    max_parallel_requests INTEGER,     -- requests in flight at once; NULL = unlimited
    max_budget     REAL,               -- spend allowed per budget period; NULL = unlimited
    budget_duration TEXT,              -- budget period such as '30d'; NULL = one period forever
    budget_reset_at TEXT,              -- when spend next resets; NULL without budget_duration
    spend          REAL NOT NULL DEFAULT 0,  -- spend in the current period; only ever incremented
    updated_at     TEXT NOT NULL,      -- last change through the API or command line
    grace_token    TEXT UNIQUE,        -- digest of the previous key after a regenerate
    grace_until    TEXT                -- the previous key works until this time
);

CREATE INDEX keys_account_type ON keys (account_type);
CREATE INDEX keys_user_id ON keys (user_id);
CREATE INDEX keys_team_id ON keys (team_id);

PRAGMA user_version = 2;
