-- The ingest benchmark's baseline: the data layer's transformations as one hand-written DuckDB
-- script over the generator's files. {folder} and {out} are filled in by bench/ingest.py.
set timezone = 'UTC';

create table holders as
select
    try_cast(account_id as bigint) as account_id,
    try_cast(opened_date as date) as opened_date,
    try_cast(age as integer) as age,
    sex, region, product,
    try_cast(credit_limit as double) as credit_limit
from read_parquet('{folder}/account_holders.parquet');

create table activity_raw as
select *, filename as _source_file
from read_parquet('{folder}/account_activity/*.parquet', filename = true);

-- The same rules as the Great Expectations suite, as SQL predicates.
create table activity_flagged as
select
    *,
    case
        when account_id is null or activity_date is null then 'missing_key'
        when try_cast(spend_amount as double) is null or try_cast(payment_amount as double) is null
            or try_cast(balance as double) is null or try_cast(n_transactions as integer) is null
            then 'wrong_type'
        when row_number() over (partition by account_id, activity_date order by _source_file) > 1
            then 'duplicate'
        when try_cast(n_transactions as integer) not between 0 and 500
            or try_cast(spend_amount as double) not between 0 and 1e6
            or try_cast(payment_amount as double) not between 0 and 1e7
            or try_cast(balance as double) not between -1e5 and 1e7 then 'out_of_range'
        when channel not in ('online', 'pos', 'atm', 'branch') then 'unknown_category'
    end as reason_code
from activity_raw;

create table quarantine as select * from activity_flagged where reason_code is not null;

create table activity as
select
    cast(account_id as bigint) as account_id,
    cast(activity_date as date) as activity_date,
    cast(n_transactions as integer) as n_transactions,
    cast(spend_amount as double) as spend_amount,
    cast(payment_amount as double) as payment_amount,
    cast(balance as double) as balance,
    cast(missed_payment as boolean) as missed_payment,
    channel
from activity_flagged where reason_code is null;

create table features as
with daily as (
    select
        a.*, h.credit_limit, h.product, h.opened_date,
        cast(a.missed_payment as integer) as missed,
        cast(a.n_transactions > 0 as integer) as active,
        a.balance / nullif(h.credit_limit, 0) as utilisation
    from activity a join holders h using (account_id)
),
windowed as (
    select
        account_id, activity_date as feature_date, credit_limit, product, balance, utilisation,
        cast(activity_date - opened_date as double) as tenure_days,
        sum(spend_amount) over w7 as spend_7d,
        sum(spend_amount) over w30 as spend_30d,
        sum(spend_amount) over w90 as spend_90d,
        sum(payment_amount) over w7 as payments_7d,
        sum(payment_amount) over w30 as payments_30d,
        sum(payment_amount) over w90 as payments_90d,
        sum(n_transactions) over w7 as transactions_7d,
        sum(n_transactions) over w30 as transactions_30d,
        sum(active) over w30 as active_days_30d,
        avg(utilisation) over w30 as avg_utilisation_30d,
        max(utilisation) over w90 as max_utilisation_90d,
        sum(missed) over w30 as missed_payments_30d,
        sum(missed) over w90 as missed_payments_90d,
        sum(cast(channel = 'online' as integer)) over w30 as online_30d,
        sum(cast(channel = 'pos' as integer)) over w30 as pos_30d,
        sum(cast(channel = 'atm' as integer)) over w30 as atm_30d,
        sum(cast(channel = 'branch' as integer)) over w30 as branch_30d
    from daily
    window
        w7 as (partition by account_id order by activity_date
               range between interval 6 day preceding and current row),
        w30 as (partition by account_id order by activity_date
                range between interval 29 day preceding and current row),
        w90 as (partition by account_id order by activity_date
                range between interval 89 day preceding and current row)
)
select
    account_id, feature_date,
    cast(feature_date + interval 1 day as timestamptz) as event_timestamp,
    now() as created_timestamp,
    spend_7d, spend_30d, spend_90d, payments_7d, payments_30d, payments_90d,
    cast(transactions_7d as double) as transactions_7d,
    cast(transactions_30d as double) as transactions_30d,
    cast(active_days_30d as double) as active_days_30d,
    balance, utilisation, avg_utilisation_30d, max_utilisation_90d,
    cast(missed_payments_30d as double) as missed_payments_30d,
    cast(missed_payments_90d as double) as missed_payments_90d,
    credit_limit, tenure_days, product,
    case greatest(online_30d, pos_30d, atm_30d, branch_30d)
        when online_30d then 'online' when pos_30d then 'pos' when atm_30d then 'atm'
        else 'branch' end as main_channel_30d
from windowed;

create table labels as
select
    l.account_id,
    cast(l.observation_date as date) + interval 1 day as event_timestamp,
    cast(l.label_date as date) + interval 1 day as label_timestamp,
    cast(l.defaulted as bigint) as defaulted,
    case
        when h.age < 26 then '18-25' when h.age < 36 then '26-35' when h.age < 51 then '36-50'
        when h.age < 66 then '51-65' else '66+'
    end as age_band,
    h.sex, h.region,
    cast(l.label_date as date) as label_date
from read_parquet('{folder}/default_labels/*.parquet') l
left join holders h using (account_id);

copy (select * from features) to '{out}/features' (format parquet, partition_by (feature_date));
copy (select * from labels) to '{out}/labels' (format parquet, partition_by (label_date));
