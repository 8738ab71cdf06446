-- Per-account features as of the end of each day, from that day and the days before it only.
-- Incremental by day: Dagster passes the partition range; 89 days of history feed the windows.
{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='feature_date',
        tags=['daily'],
    )
}}

with

activity as (
    select * from {{ ref('int_account_activity_unioned') }}
    where {{ in_partition_window('activity_date', lookback_days=89) }}
),

accounts as (
    select * from {{ ref('dim_accounts') }}
),

daily as (
    select
        activity.account_id,
        activity.activity_date,
        activity.n_transactions,
        activity.spend_amount,
        activity.payment_amount,
        activity.balance,
        activity.channel,
        accounts.credit_limit,
        accounts.product,
        accounts.opened_date,
        cast(activity.missed_payment as integer) as missed,
        cast(activity.n_transactions > 0 as integer) as active,
        activity.balance / nullif(accounts.credit_limit, 0) as utilisation
    from activity
    inner join accounts on activity.account_id = accounts.account_id
),

windowed as (
    select
        account_id,
        activity_date as feature_date,
        credit_limit,
        product,
        balance,
        utilisation,
        cast(activity_date - opened_date as double) as tenure_days,
        sum(spend_amount) over last_7_days as spend_7d,
        sum(spend_amount) over last_30_days as spend_30d,
        sum(spend_amount) over last_90_days as spend_90d,
        sum(payment_amount) over last_7_days as payments_7d,
        sum(payment_amount) over last_30_days as payments_30d,
        sum(payment_amount) over last_90_days as payments_90d,
        sum(n_transactions) over last_7_days as transactions_7d,
        sum(n_transactions) over last_30_days as transactions_30d,
        sum(active) over last_30_days as active_days_30d,
        avg(utilisation) over last_30_days as avg_utilisation_30d,
        max(utilisation) over last_90_days as max_utilisation_90d,
        sum(missed) over last_30_days as missed_payments_30d,
        sum(missed) over last_90_days as missed_payments_90d,
        sum(cast(channel = 'online' as integer)) over last_30_days as online_30d,
        sum(cast(channel = 'pos' as integer)) over last_30_days as pos_30d,
        sum(cast(channel = 'atm' as integer)) over last_30_days as atm_30d,
        sum(cast(channel = 'branch' as integer)) over last_30_days as branch_30d
    from daily
    window
        last_7_days as (
            partition by account_id order by activity_date
            range between interval 6 day preceding and current row
        ),
        last_30_days as (
            partition by account_id order by activity_date
            range between interval 29 day preceding and current row
        ),
        last_90_days as (
            partition by account_id order by activity_date
            range between interval 89 day preceding and current row
        )
),

final as (
    select
        account_id,
        feature_date,
        -- Stamped at the end of the day: a day's features are known once the day is over.
        cast(feature_date + interval 1 day as timestamptz) as event_timestamp,
        cast(now() as timestamptz) as created_timestamp,
        cast(spend_7d as double) as spend_7d,
        cast(spend_30d as double) as spend_30d,
        cast(spend_90d as double) as spend_90d,
        cast(payments_7d as double) as payments_7d,
        cast(payments_30d as double) as payments_30d,
        cast(payments_90d as double) as payments_90d,
        cast(transactions_7d as double) as transactions_7d,
        cast(transactions_30d as double) as transactions_30d,
        cast(active_days_30d as double) as active_days_30d,
        cast(balance as double) as balance,
        cast(utilisation as double) as utilisation,
        cast(avg_utilisation_30d as double) as avg_utilisation_30d,
        cast(max_utilisation_90d as double) as max_utilisation_90d,
        cast(missed_payments_30d as double) as missed_payments_30d,
        cast(missed_payments_90d as double) as missed_payments_90d,
        cast(credit_limit as double) as credit_limit,
        tenure_days,
        product,
        case greatest(online_30d, pos_30d, atm_30d, branch_30d)
            when online_30d then 'online'
            when pos_30d then 'pos'
            when atm_30d then 'atm'
            else 'branch'
        end as main_channel_30d
    from windowed
    where {{ in_partition_window('feature_date') }}
)

select * from final
