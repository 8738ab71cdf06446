with

source as (
    {{ clean_rows(source('generator', 'account_holders'), 'account_holders') }}
),

renamed as (
    select
        cast(account_id as bigint) as account_id,
        cast(opened_date as date) as opened_date,
        cast(age as integer) as age,
        sex,
        region,
        product,
        cast(credit_limit as double) as credit_limit
    from source
)

select * from renamed
