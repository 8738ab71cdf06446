-- One default outcome per Taiwan client, for the payment due in October 2005: observed over
-- the month after the last statement (2005-09-30), known at 2005-10-31.
with

clients as (
    select * from {{ ref('stg_taiwan__credit_clients') }}
),

final as (
    select
        client_id,
        cast('2005-10-31' as timestamptz) as event_timestamp,
        cast('2005-09-30' as timestamptz) as observation_date,
        defaulted,
        sex,
        {{ age_band('age') }} as age_band,
        -- Named groups, so that the fairness report reads without the codebook.
        case marriage
            when 1 then 'married' when 2 then 'single' when 3 then 'other' else 'unknown'
        end as marriage,
        case education
            when 1 then 'graduate school'
            when 2 then 'university'
            when 3 then 'high school'
            when 4 then 'other'
            else 'unknown'
        end as education
    from clients
)

select * from final
