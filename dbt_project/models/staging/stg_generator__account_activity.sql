with

source as (
    {{ clean_rows(source('generator', 'account_activity'), 'account_activity') }}
),

renamed as (
    select
        cast(account_id as bigint) as account_id,
        cast(activity_date as date) as activity_date,
        cast(n_transactions as integer) as n_transactions,
        cast(spend_amount as double) as spend_amount,
        cast(payment_amount as double) as payment_amount,
        cast(balance as double) as balance,
        cast(missed_payment as boolean) as missed_payment,
        channel,
        _loaded_at as loaded_at,
        'generator' as source_system
    from source
)

select * from renamed
