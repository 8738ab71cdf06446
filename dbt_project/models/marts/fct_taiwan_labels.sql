-- One default outcome per Taiwan client, for the payment due in October 2005.
with

clients as (
    select * from {{ ref('stg_taiwan__credit_clients') }}
),

final as (
    select
        client_id,
        cast('2005-10-31' as timestamptz) as event_timestamp,
        defaulted,
        sex,
        {{ age_band('age') }} as age_band
    from clients
)

select * from final
