-- Version 2 -> 3: the usage ledger and the spend views.  The keys table
-- already had its spend and budget columns.
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
