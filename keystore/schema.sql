-- Keystile keystore, schema version 3 (PRAGMA user_version).
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

-- One row per request that passed authentication, whatever its outcome,
-- written in batches within 200 ms of the response's end.  Rejected
-- requests have a status and no tokens.
CREATE TABLE usage (
    id             INTEGER PRIMARY KEY,
    time           TEXT NOT NULL,      -- when the request arrived
    key_hash       TEXT,               -- keys.token of the caller; NULL for the master key
    key_alias      TEXT,               -- the key's alias at the time of the request
    account_type   TEXT NOT NULL,      -- 'user', 'service_account' or 'master'
    end_user       TEXT,               -- the request body's "user" field
    endpoint       TEXT NOT NULL,      -- 'chat/completions', 'completions' or 'embeddings'
    model_group    TEXT,               -- public model name; NULL if refused before it was known
    deployment_id  TEXT,               -- the deployment that answered; NULL if none was called
    status         INTEGER NOT NULL,   -- HTTP status to the client; 499 = the client hung up
    prompt_tokens  INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost           REAL NOT NULL DEFAULT 0,  -- tokens times the deployment's model_info prices
    latency_ms     REAL NOT NULL,      -- arrival to the end of the response
    ttfb_ms        REAL,               -- arrival to the answer's first bytes; NULL if none
    estimated      INTEGER NOT NULL DEFAULT 0 CHECK (estimated IN (0, 1))
                                       -- 1 = tokens estimated from characters (a cut-off stream)
);

CREATE INDEX usage_time ON usage (time);
CREATE INDEX usage_key_hash ON usage (key_hash, time);
CREATE INDEX usage_end_user ON usage (end_user, time);

-- The answers of GET /spend/report, over all time.
CREATE VIEW spend_by_key AS
SELECT key_hash, MAX(key_alias) AS key_alias,
       COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens,
       SUM(completion_tokens) AS completion_tokens,
       SUM(prompt_tokens + completion_tokens) AS total_tokens, SUM(cost) AS cost,
       SUM(estimated) AS estimated_requests, MIN(time) AS first_request,
       MAX(time) AS last_request
FROM usage GROUP BY key_hash;

CREATE VIEW spend_by_user AS
SELECT end_user,
       COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens,
       SUM(completion_tokens) AS completion_tokens,
       SUM(prompt_tokens + completion_tokens) AS total_tokens, SUM(cost) AS cost,
       SUM(estimated) AS estimated_requests, MIN(time) AS first_request,
       MAX(time) AS last_request
FROM usage GROUP BY end_user;

CREATE VIEW spend_by_model AS
SELECT model_group,
       COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens,
       SUM(completion_tokens) AS completion_tokens,
       SUM(prompt_tokens + completion_tokens) AS total_tokens, SUM(cost) AS cost,
       SUM(estimated) AS estimated_requests, MIN(time) AS first_request,
       MAX(time) AS last_request
FROM usage GROUP BY model_group;

-- Spend per day, key and model: the usual "who spent what, on which model".
CREATE VIEW spend_by_day AS
SELECT substr(time, 1, 10) AS day, key_hash, MAX(key_alias) AS key_alias, model_group,
       COUNT(*) AS requests, SUM(prompt_tokens + completion_tokens) AS total_tokens,
       SUM(cost) AS cost
FROM usage GROUP BY day, key_hash, model_group;

PRAGMA user_version = 3;
